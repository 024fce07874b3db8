"""Thing models: loading the JSON files, compiling them to JSON Schema, checking points, wording refusals.

Pure (files are read only by ``load_models``/``check_paths``). May import: ``service.errors`` and
``service.protocol.replies`` (values are quoted back to devices in the same words everywhere).
"""
