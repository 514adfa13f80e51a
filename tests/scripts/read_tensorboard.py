"""Reads the TensorBoard event files under a directory with TensorBoard's own reader
(EventAccumulator) and prints {run: {tag: [[step, value], ...]}} as JSON, where run is
the event files' directory relative to the root. Used by the tests to check what
`--tensorboard` writes."""
import json
import os
import sys

from tensorboard.backend.event_processing import event_accumulator as ea

root = sys.argv[1]
out = {}
for d, _, files in sorted(os.walk(root)):
    if any("tfevents" in f for f in files):
        acc = ea.EventAccumulator(d, size_guidance={ea.SCALARS: 0})
        acc.Reload()
        out[os.path.relpath(d, root)] = {
            t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]
        }
json.dump(out, sys.stdout)
