"""README.md tells the truth about what the code defines: the reply-code table is the generated one."""

from __future__ import annotations

from pathlib import Path

from service.protocol import replies

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_reply_table_is_generated_from_reply_codes() -> None:
    """The README's "Reply codes" table is exactly ``python -m service.protocol.replies``'s output."""
    text = README.read_text(encoding="utf-8")
    section = text.split("### Reply codes", 1)[1].split("\n## ", 1)[0]
    table = "".join(line + "\n" for line in section.splitlines() if line.startswith("|"))
    assert table == replies.markdown_table()
