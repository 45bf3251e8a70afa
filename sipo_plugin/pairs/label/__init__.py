"""``sipo-pairs label``: a local page to label pairs of candidates by eye.

`schedule` (which pairs to show: pure functions), `store` (DIR/labels.jsonl, append-only, and the
folder lock), `session` (the server's state), `server` (HTTP), `command` (the CLI), `export`
(`pairs_from_labels`, which `sipo-pairs make --from-labels` calls).
"""
