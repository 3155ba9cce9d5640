"""
Hand-over to NVIDIA kvpress: a LU-KV profile of this project as kvpress's LUKVPress, and the line that makes it.

kvpress (0.5.5) ships LUKVPress, which prunes every (layer, KV head) by a precomputed table
[99, n_layer, n_kv_head] of prune ratios (row round(100 * ratio) - 1), the layout lukv.py's profiles
are saved in. kvpress looks its tables up by model name; `lukv_press` hands it one of ours instead.
A table belongs to one scorer and one (sink, window): `kvpress_usage` writes the kvpress line whose
scorer, window and pooling are the profile's, and says so where kvpress's scorer cannot be ours.
tests/test_peers.py checks both on a small random Llama against kvpress itself, and runs the line
recorded in every shipped table's sidecar. kvpress is imported only inside the functions: the rest
of the project never needs it.

    pip install kvpress==0.5.5 transformers==5.2.0                    # the pinned peers (requirements-hf.txt)
    python -m experiments.peers checkpoints/tiny_snapkv.npy --scorer snapkv   # print the usage line
    python -m pytest -q tests/test_peers.py                           # ours against kvpress, about 20 s on a CPU
"""

import os

import numpy as np

import lukv
import solver
import tasks

# our scorer -> kvpress's press of the same rule (Expected Attention, SnapKV, KeyDiff, K-norm, StreamingLLM)
PRESSES = {"expected_attention": "ExpectedAttentionPress", "snapkv": "SnapKVPress", "keydiff": "KeyDiffPress",
           "knorm": "KnormPress", "streaming": "StreamingLLMPress"}


def profile_settings(scorer, path, cfg):
    """The settings a profile was made with: its sidecar's, else cfg's; refuse a sidecar that disagrees with cfg."""
    meta = {}
    if os.path.exists(solver.sidecar(path)):
        meta = solver.read_sidecar(path)
        if scorer == "snapkv":
            meta.setdefault("snap_pool", "max")  # profiles from before snap_pool existed were max-pooled
    want = {"scorer": scorer, "sink": cfg.sink, "window": cfg.window,
            **{k: getattr(cfg, k) for k in lukv.SCORER_CHECKS.get(scorer, [])}}  # only a scorer's own options
    differ = {k: (meta[k], v) for k, v in want.items() if k in meta and meta[k] != v}
    if differ:
        raise ValueError(f"profile {path} was made with {', '.join(f'{k} {m!r}' for k, (m, _) in differ.items())}, "
                         f"not {', '.join(f'{k} {v!r}' for k, (_, v) in differ.items())}; pass the profile's settings")
    return {**want, **{k: meta[k] for k in want if k in meta}}


def scorer_press_source(scorer, settings):
    """(Python source of kvpress's press for our scorer, [why it cannot rank as ours does])."""
    if scorer not in PRESSES:
        raise ValueError(f"kvpress has no press for scorer {scorer!r} (the oracle needs the future); "
                         f"expected one of {list(PRESSES)}")
    s, notes = settings, []
    if scorer == "expected_attention":
        # kvpress's n_sink both skips the sinks' queries in the statistics and keeps the sinks, as our sink
        return f"ExpectedAttentionPress(epsilon={s['ea_epsilon']}, n_sink={s['sink']}, " \
               f"n_future_positions={s['ea_future']})", notes
    if scorer == "snapkv":
        if s["snap_pool"] != "avg":
            notes.append(f"kvpress's SnapKVPress average-pools; this profile was made with {s['snap_pool']} pooling")
        if s["snap_window"] > s["window"]:
            notes.append(f"kvpress's SnapKVPress keeps its whole {s['snap_window']}-token observation window, "
                         f"ours only the last {s['window']} tokens")
        return f"SnapKVPress(window_size={s['snap_window']}, kernel_size={s['snap_kernel']})", notes
    if scorer == "streaming":
        notes.append("kvpress's StreamingLLMPress scores by its own compression_ratio, which LUKVPress leaves at 0: "
                     "every token ties and the oldest are kept; no kvpress press ranks as ours")
        return f"StreamingLLMPress(n_sink={s['sink']})", notes
    return f"{PRESSES[scorer]}()", notes


def kvpress_usage(scorer, path, cfg):
    """One line of Python that builds kvpress's LUKVPress for this profile, with the profile's scorer,
    sink, window and pooling; a trailing comment says where kvpress's scorer cannot match ours.

    The table is named relative to the repository when it lies inside it, so the line runs from the root
    of any clone; then press.compression_ratio = 0.8 and `with press(model): model(input_ids,
    past_key_values=cache)` (kvpress's usual way)."""
    settings = profile_settings(scorer, path, cfg)
    press, notes = scorer_press_source(scorer, settings)
    where = os.path.relpath(os.path.abspath(path), tasks.ROOT)
    where = os.path.abspath(path) if where.startswith("..") else where
    line = (f"from kvpress import {press.split('(')[0]}; from experiments import peers; press = peers.lukv_press("
            f"{where!r}, {press}, sink={settings['sink']}, window={settings['window']})")
    return line + (f"  # does not match ours: {'; '.join(notes)}" if notes else "")


def lukv_press(table_path, scorer_press, sink=4, window=1, compression_ratio=0.0, model=None):
    """kvpress's LUKVPress around scorer_press, pruning by the table at table_path (a profile of ours).

    The table is checked (shape [99, L, H], prune ratios in [0, 1]; its sidecar's scorer, sink and
    window if there is one; the model's L and H if model is given) and set on the press, which then
    skips its own look-up by model name. This is the one place that writes kvpress's private
    `_budget_curves`: LUKVPress 0.5.5 has no public way to take a table."""
    from kvpress import LUKVPress

    table = solver.read_npy(table_path, "profile table", "restore it or profile again")
    solver.check_table(table, table_path)
    if os.path.exists(solver.sidecar(table_path)):
        meta = solver.read_sidecar(table_path)
        press_name = type(scorer_press).__name__
        if PRESSES.get(meta.get("scorer")) != press_name:
            raise ValueError(f"{table_path} was profiled with scorer {meta.get('scorer')!r} "
                             f"({PRESSES.get(meta.get('scorer'))}), not for {press_name}")
        if (meta.get("sink"), meta.get("window")) != (sink, window):
            raise ValueError(f"{table_path} was profiled with sink {meta.get('sink')} and window "
                             f"{meta.get('window')}, not sink {sink} and window {window}")
    if model is not None:
        c = model.config
        shape = (99, c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
        if table.shape != shape:
            raise ValueError(f"{table_path} has shape {table.shape}, the model needs {shape}")
    press = LUKVPress(press=scorer_press, compression_ratio=compression_ratio, sink=sink, window=window)
    press._budget_curves = table.astype(np.float32)
    return press


def parse(argv=None):
    """(parser, args), every argument checked before any work: the profile must exist and be a table."""
    parser = tasks.ArgumentParser(description=__doc__)
    parser.add_argument("profile", help="a profile .npy (its .json sidecar beside it)")
    parser.add_argument("--scorer", required=True, choices=list(PRESSES))
    # ---- the settings the profile was made with (checked against its sidecar)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--snap-window", type=int, default=16)
    parser.add_argument("--snap-pool", default="avg", choices=["avg", "max"])
    parser.add_argument("--ea-epsilon", type=float, default=0.02)
    args = parser.parse_args(argv)
    if not args.profile.endswith(".npy") or not os.path.isfile(args.profile):
        parser.error(f"{args.profile}: expected an existing profile .npy (with its .json sidecar beside it)")
    try:
        args.cfg = lukv.LUKVConfig(sink=args.sink, window=args.window, snap_window=args.snap_window,
                                   snap_pool=args.snap_pool, ea_epsilon=args.ea_epsilon)
        solver.check_table(solver.read_npy(args.profile, "profile table", "restore it or profile again"), args.profile)
    except ValueError as e:
        parser.error(str(e))
    return parser, args


if __name__ == "__main__":
    parser, args = parse()
    try:
        print(kvpress_usage(args.scorer, args.profile, args.cfg))
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
