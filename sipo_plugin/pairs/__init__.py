"""From your own model to preference pairs: ``sipo-pairs`` (also ``python -m sipo_plugin.pairs``).

Each subcommand does one step and writes files the next one reads, in one candidates folder DIR:

    sample  DIR/candidates.jsonl + DIR/images/ (clips for video families) + DIR/latents/
    score   DIR/scores.jsonl                      (reward models, `sipo_plugin.rewards`)
    label   DIR/labels.jsonl                      (a page in the browser, by eye)
    make    a pair manifest (the JSONL pair format train_sipo.py reads)

The candidate record is `sipo_plugin.pairs.candidates.Candidate`.
"""
