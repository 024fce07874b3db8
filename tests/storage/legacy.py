"""Today's layout before issue 10, frozen: migrations 0001-0002 and the writer statement that filled ``point_data``.

Used to hold the new layout to what the old one stored and returned, and to test upgrading real old data.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import orjson

from service.pipeline import Row
from service.resources import migrations_dir
from service.storage.migrate import apply_migrations

LAST_OLD_VERSION = 2

UPSERT = """
INSERT INTO point_data (product_key, device_key, point, ts, value_num, value_text, value_bool, value_json,
                        quality, received_at)
SELECT pk, dk, p, 'epoch'::timestamptz + t * interval '1 millisecond', vn, vt, vb, vj, q,
       'epoch'::timestamptz + r * interval '1 millisecond'
FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::float8[], $6::text[], $7::bool[], $8::jsonb[],
            $9::int2[], $10::int8[]) AS u(pk, dk, p, t, vn, vt, vb, vj, q, r)
ON CONFLICT (product_key, device_key, point, ts) DO UPDATE SET
    value_num = EXCLUDED.value_num, value_text = EXCLUDED.value_text, value_bool = EXCLUDED.value_bool,
    value_json = EXCLUDED.value_json, quality = EXCLUDED.quality, received_at = EXCLUDED.received_at
"""


def old_migrations(directory: Path) -> Path:
    """A copy of the shipped migrations up to the old layout (0001-0002)."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in migrations_dir().glob("*.sql"):
        if int(path.name.split("_", 1)[0]) <= LAST_OLD_VERSION:
            shutil.copy(path, directory / path.name)
    return directory


def columns(rows: Sequence[Row]) -> tuple[list[object], ...]:
    """The old writer's ten arrays (last write per key wins)."""
    latest: dict[tuple[str, str, str, int], Row] = {}
    for row in rows:
        latest[(row.product_key, row.device_key, row.point, row.time_ms)] = row
    cols: tuple[list[object], ...] = tuple([] for _ in range(10))
    pk, dk, pt, ts, vn, vt, vb, vj, q, r = cols
    for row in latest.values():
        value = row.value
        pk.append(row.product_key)
        dk.append(row.device_key)
        pt.append(row.point)
        ts.append(row.time_ms)
        vn.append(float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None)
        vt.append(value if isinstance(value, str) else None)
        vb.append(value if isinstance(value, bool) else None)
        vj.append(orjson.dumps(value).decode() if value is None or isinstance(value, list | dict) else None)
        q.append(row.quality)
        r.append(row.received_ms)
    return cols


async def write_old(dsn: str, batches: Sequence[Sequence[Row]], migrations: Path) -> None:
    """Create the old layout in ``dsn`` and write ``batches`` the way the old writer did."""
    conn = await asyncpg.connect(dsn)
    try:
        await apply_migrations(conn, migrations)
        for batch in batches:
            async with conn.transaction():
                await conn.execute(UPSERT, *columns(batch))
    finally:
        await conn.close()
