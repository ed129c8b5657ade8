"""Checkpoints on disk: one directory per step, one file per (MoE layer, expert).

A checkpoint is a directory. Layout of `<directory>/step_N/`:
    meta.json                  format, step, config, extra (JSON part), layout, sha256 per file
    dense.safetensors          every non-expert tensor of the model (written by rank 0)
    experts/layer_I_expert_E.safetensors
                               expert E (global id) of the I-th expert stack (`moe.experts.Experts`) (in
                               `named_modules` order): each of its stacked tensors sliced to
                               [1, ...] under the module's own name (`w1_EDH`, ...)
    optimizer/rank_R.json, optimizer/rank_R.safetensors
                               rank R's optimizer state: tensors + the JSON rest (no pickle)
    extra.safetensors          the tensors of `extra`, if any
`<directory>/latest` names the newest complete step directory.

Writing is atomic: every rank writes into `<directory>/.step_N.tmp/`; rank 0 then writes
meta.json (the union of the ranks' manifests), renames the directory to `step_N` and
replaces `latest` (write + os.replace). A crash at any point leaves the previous `latest`
and no `step_N` that looks whole.

Resharding: a model loads, for each expert stack, the files of exactly the experts it
holds (its `expert_ids`), so a checkpoint written at EP=4 loads at EP=2 or EP=1, and a
task subset checkpoint (meta.json's `moe_layers[i].expert_ids` lists the global ids it
holds; `quantization` says how they are stored) loads without the full one. Optimizer state restores only when the layout of ranks
matches (same world size, same experts per rank); otherwise load the weights alone.

Distributed saves take the process group explicitly (`group=`); the phases
(`begin_checkpoint`, `write_checkpoint_shard`, `finalize_checkpoint`) are public so that a
single process can also write the shards of several ranks.
"""

from moe.checkpoint.files import (
    FORMAT,
    FORMAT_VERSION,
    LATEST_FILE,
    META_FILE,
    decode_state,
    encode_state,
    expert_file,
    read_meta,
    verify_checkpoint,
)
from moe.checkpoint.load import LoadedCheckpoint, load_checkpoint, resolve_latest
from moe.checkpoint.save import (
    ShardManifest,
    begin_checkpoint,
    finalize_checkpoint,
    save_checkpoint,
    write_checkpoint_shard,
)
from moe.experts import expert_modules

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LATEST_FILE",
    "META_FILE",
    "LoadedCheckpoint",
    "ShardManifest",
    "begin_checkpoint",
    "decode_state",
    "encode_state",
    "expert_file",
    "expert_modules",
    "finalize_checkpoint",
    "load_checkpoint",
    "read_meta",
    "resolve_latest",
    "save_checkpoint",
    "verify_checkpoint",
    "write_checkpoint_shard",
]
