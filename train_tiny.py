"""
Train the tiny model that ships in checkpoints/: language modelling on generated prose plus
every task family of tasks.py, at mixed lengths.

    python train_tiny.py --smoke                   # a 2-layer toy on a laptop CPU, under a minute (runs/tiny/)
    python train_tiny.py --out runs/tiny           # the shipped model's configuration (a GPU; results/TRAINING.md)

Runs in chunks: `--time-limit` seconds per call, a resume file saved every `--save-every`
steps and at the end of each chunk; calling the same command again continues exactly where it
stopped (model, optimizer, data position and schedule: the batch of step s is a pure function
of (seed, s)). When `--max-steps` is reached the fp16 checkpoint `tiny.pt` is written into
`--out` (default runs/tiny, never the shipped checkpoints/ unless named), with the command and
the seed that made it; a tiny.pt of another configuration there is never overwritten.
"""

import math
import os
import random
import shlex
import sys
import time

import torch

import tasks
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint

# -----------------------------------------------------------------------------
# the data: a batch is a pure function of (seed, step)

# training mixture: family -> weight ("prose" is plain language modelling)
MIXTURE = {"prose": 0.08, "qa": 0.2, "niah_single": 0.06, "niah_multikey": 0.14, "niah_multivalue": 0.12,
           "niah_multiquery": 0.12, "vt": 0.16, "cwe": 0.06, "fwe": 0.06}


def parse_mixture(text):
    """'vt=0.3,qa=0.3,...' -> {family: weight}; unknown names are refused."""
    mixture = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in MIXTURE:
            raise ValueError(f"unknown family {name!r} in --mixture; expected names from {list(MIXTURE)}")
        mixture[name] = float(weight)
    return mixture


def encode_example(enc, ex):
    """Token ids of context + every (question, answer) + newline, and a mask of answer tokens."""
    ids = enc.encode_ordinary(ex.context)
    is_answer = [False] * len(ids)
    for q, a in ex.qa:
        q_ids, a_ids = enc.encode_ordinary(q), enc.encode_ordinary(a + "\n")
        ids += q_ids + a_ids
        is_answer += [False] * len(q_ids) + [True] * len(a_ids)
    return ids, is_answer


def make_row(enc, rng, seq_len, family):
    """One training row of exactly seq_len + 1 tokens: [prose filler, EOT,] example."""
    n_tokens = seq_len
    while True:
        if family == "prose":
            ids = enc.encode_ordinary(" ".join(tasks.prose_sentences(rng, int(seq_len * 0.9))[0]))
            ids, is_answer = ids[:seq_len + 1], [False] * min(len(ids), seq_len + 1)
        else:
            n_questions = rng.randint(1, 4)
            ex = tasks.make_example(family, rng, max(64, n_tokens), n_questions)
            ids, is_answer = encode_example(enc, ex)
        if len(ids) <= seq_len + 1:
            break
        n_tokens = int(n_tokens * 0.9) - 8  # too long: ask for a shorter context
    pad = seq_len + 1 - len(ids)
    if pad > 0:  # fill the front with unrelated prose, separated by <|endoftext|>
        filler = enc.encode_ordinary(" ".join(tasks.prose_sentences(rng, pad)[0]))[-(pad - 1):] if pad > 1 else []
        filler = [enc.eot_token] * (pad - 1 - len(filler)) + filler + [enc.eot_token]
        ids, is_answer = filler + ids, [False] * pad + is_answer
    return ids, is_answer


class Batches(torch.utils.data.Dataset):
    """dataset[step] -> (x, y, w) for that step; workers build batches in parallel."""

    def __init__(self, enc, args):
        self.enc, self.args = enc, args
        mixture = parse_mixture(args.mixture) if args.mixture else MIXTURE
        self.families, self.weights = list(mixture), list(mixture.values())

    def seq_len(self, step):
        lens = [int(x) for x in self.args.seq_lens.split(",")]
        return random.Random(f"len-{self.args.seed}-{step}").choice(lens)

    def __len__(self):
        return self.args.max_steps

    def __getitem__(self, step):
        T = self.seq_len(step)
        B = max(1, self.args.tokens_per_step // T)
        rows, answers = [], []
        for r in range(B):
            rng = random.Random(f"{self.args.seed}-{step}-{r}")
            family = rng.choices(self.families, self.weights)[0]
            ids, is_answer = make_row(self.enc, rng, T, family)
            rows.append(ids)
            answers.append(is_answer)
        data = torch.tensor(rows)  # (B, T+1)
        w = 1.0 + (self.args.answer_weight - 1.0) * torch.tensor(answers, dtype=torch.float32)[:, 1:]
        return data[:, :-1], data[:, 1:], w  # x, y (B, T); w weights each target


# -----------------------------------------------------------------------------
# a quick dev measure: teacher-forced exact match of every answer token, per family


@torch.no_grad()
def dev_accuracy(model, enc, n_tokens, n_per_family, device, seed=1234):
    """Fraction of examples whose answer tokens are all the argmax under teacher forcing.

    Equal to greedy exact match for order-sensitive families (a lower bound for set-valued ones).
    """
    model.eval()
    acc = {}
    for family in tasks.FAMILIES:
        hits = 0
        for ex in tasks.example_set(family, n_per_family, n_tokens, seed):
            ids, is_answer = encode_example(enc, ex)
            x = torch.tensor([ids], device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x[:, :-1])
            pred = logits[0].argmax(-1)  # (T-1,)
            ans = torch.tensor(is_answer[1:], device=device)
            hits += int((pred[ans] == x[0, 1:][ans]).all())
        acc[family] = hits / n_per_family
    model.train()
    return acc


# -----------------------------------------------------------------------------

def parse(argv=None):
    """(parser, args), every argument checked before any work (the data, the model and the run folder)."""
    parser = tasks.ArgumentParser(description=__doc__)
    # ---- output and chunking
    parser.add_argument("--out", default="runs/tiny", help="folder for tiny.pt, the resume file and the log "
                        "(the shipped checkpoints/ only when named)")
    parser.add_argument("--tokenizer", default="checkpoints/tiny.tiktoken", help="BPE rank file (made if missing)")
    parser.add_argument("--time-limit", type=float, default=540, help="seconds per call; then save and exit")
    parser.add_argument("--chunk-steps", type=int, default=None, help="also stop after this many steps per call")
    parser.add_argument("--save-every", type=int, default=500, help="steps between resume files")
    parser.add_argument("--smoke", action="store_true", help="a tiny CPU configuration that runs in under a minute")
    # ---- model
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--n-kv-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=4096)
    # ---- data
    parser.add_argument("--seed", type=int, default=0, help="data seed (evaluation uses other seeds)")
    parser.add_argument("--mixture", default=None, help="family=weight,... (default: MIXTURE above)")
    parser.add_argument("--init-from", default=None, help="start from this checkpoint's weights (a second stage)")
    parser.add_argument("--seq-lens", default="512,1024,1024,2048", help="row lengths, one drawn per step")
    parser.add_argument("--tokens-per-step", type=int, default=65536)
    parser.add_argument("--answer-weight", type=float, default=5.0, help="loss weight of answer tokens")
    parser.add_argument("--workers", type=int, default=8, help="data-loader processes")
    # ---- optimisation
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine decay ends at lr * this")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    # ---- logging
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=500, help="steps between dev accuracy lines")
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--eval-n", type=int, default=32, help="dev examples per family")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):  # smoke sizes become the defaults; flags given explicitly still win
        parser.set_defaults(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=1024, seq_lens="256",
                            tokens_per_step=2048, max_steps=60, warmup=10, log_every=10, eval_every=60,
                            eval_tokens=256, eval_n=2, workers=0)
    parser.add_argument("--overwrite", action="store_true", help="allow --out to be the shipped checkpoints/")
    args = parser.parse_args(argv)
    for name, low in [("n_layer", 1), ("n_head", 1), ("n_kv_head", 1), ("n_embd", 1), ("block_size", 16),
                      ("tokens_per_step", 1), ("max_steps", 1), ("warmup", 0), ("workers", 0), ("log_every", 1),
                      ("eval_every", 1), ("eval_tokens", 64), ("eval_n", 1), ("save_every", 1)]:
        tasks.check_range(parser, "--" + name.replace("_", "-"), getattr(args, name), low)
    if args.chunk_steps is not None:
        tasks.check_range(parser, "--chunk-steps", args.chunk_steps, 1)
    if args.n_head % args.n_kv_head or args.n_embd % args.n_head:
        parser.error(f"--n-kv-head {args.n_kv_head} must divide --n-head {args.n_head}, which must divide --n-embd "
                     f"{args.n_embd}")
    if not (args.lr > 0 and 0 <= args.min_lr_frac <= 1 and args.weight_decay >= 0 and args.grad_clip > 0
            and args.answer_weight > 0 and args.time_limit > 0):
        parser.error("expected --lr, --grad-clip, --answer-weight and --time-limit > 0, 0 <= --min-lr-frac <= 1 and "
                     "--weight-decay >= 0")
    try:
        lens = [int(x) for x in args.seq_lens.split(",")]
        mixture = parse_mixture(args.mixture) if args.mixture else MIXTURE
    except ValueError as e:
        parser.error(f"--seq-lens must be a comma list of integers and --mixture family=weight pairs ({e})")
    if not all(64 <= n <= args.block_size for n in lens) or not all(w >= 0 for w in mixture.values()) \
            or sum(mixture.values()) <= 0:
        parser.error(f"--seq-lens must lie in [64, --block-size {args.block_size}] and --mixture weights be >= 0 "
                     f"with a positive sum")
    tasks.check_output(parser, os.path.join(args.out, "tiny.pt"), ".pt", args.overwrite)
    if args.init_from and not os.path.isfile(args.init_from):
        parser.error(f"--init-from {args.init_from}: no such checkpoint")
    if not os.path.exists(args.tokenizer):  # made by the run: it must be writable
        tasks.check_output(parser, args.tokenizer, ".tiktoken")
    if args.compile and not torch.cuda.is_available():
        parser.error("--compile compiles for CUDA, and there is no CUDA device here")
    return parser, args


def main(argv=None):
    parser, args = parse(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    if not os.path.exists(args.tokenizer):
        ranks = tasks.train_bpe(tasks.tokenizer_corpus(), 4096)
        tasks.save_ranks(ranks, args.tokenizer)
    enc = tasks.load_tokenizer(args.tokenizer)
    cfg = GPTConfig(vocab_size=enc.n_vocab, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                    n_kv_head=args.n_kv_head, n_embd=args.n_embd,
                    mlp_hidden=64 * math.ceil(8 * args.n_embd / 3 / 64))
    ckpt_path = os.path.join(args.out, "tiny.pt")
    if os.path.exists(ckpt_path):  # refuse now, not after the run: never replace a model of another shape
        old = torch.load(ckpt_path, map_location="cpu", weights_only=True)["config"]
        if old != cfg.__dict__:
            parser.error(f"{ckpt_path} holds a model of another configuration ({old}); this run builds {cfg.__dict__}. "
                     f"Give another --out (the default is runs/tiny) or move that file away")
    model = GPT(cfg).to(device)
    init_meta = None
    if args.init_from:  # a second training stage starts from shipped weights with a fresh optimizer
        init, header = load_checkpoint(args.init_from)
        init_meta = header["meta"]
        if init.cfg != cfg:
            parser.error(f"--init-from {args.init_from} has config {init.cfg}, this run builds {cfg}")
        model.load_state_dict(init.state_dict())
        print(f"initialised from {args.init_from} ({init_meta.get('command')})")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    log_path = os.path.join(args.out, "train_log.txt")
    resume_path = os.path.join(args.out, "resume.pt")
    step, elapsed = 0, 0.0
    if os.path.exists(resume_path):
        state = torch.load(resume_path, map_location=device, weights_only=False)
        if state["args"]["seed"] != args.seed or state["config"] != cfg.__dict__:
            parser.error(f"{resume_path} belongs to another run (seed/config differ); move it away to start afresh")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resumed from {resume_path} at step {step} ({elapsed:.0f} s trained)")
    print(f"{model.num_params() / 1e6:.2f}M parameters; {args.tokens_per_step} tokens per step; "
          f"{args.max_steps} steps; device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    train_model = torch.compile(model) if args.compile else model

    def lr_at(s):
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        progress = (s - args.warmup) / max(1, args.max_steps - args.warmup)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))

    def save_resume():
        tmp = resume_path + ".tmp"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "elapsed": elapsed, "args": vars(args), "config": cfg.__dict__}, tmp)
        os.replace(tmp, resume_path)

    def log(line):
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    data = Batches(enc, args)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=args.workers,
                                         sampler=range(step, args.max_steps), prefetch_factor=4 if args.workers else None,
                                         persistent_workers=False)
    t_chunk, t_last, first_step = time.time(), time.time(), step
    model.train()
    for x, y, w in loader:
        if step >= args.max_steps or time.time() - t_chunk > args.time_limit or \
                (args.chunk_steps is not None and step - first_step >= args.chunk_steps):
            break
        x, y, w = x.to(device, non_blocking=True), y.to(device, non_blocking=True), w.to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, loss = train_model(x, y, loss_weights=w)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        if step % args.log_every == 0:
            dt = time.time() - t_last
            elapsed += dt
            t_last = time.time()
            log(f"step {step:6d} | loss {loss.item():.4f} | T {x.shape[1]:5d} | lr {lr_at(step):.2e} | "
                f"{dt / args.log_every * 1000:.0f} ms/step | {elapsed:.0f} s")
        if step % args.eval_every == 0 or step == args.max_steps:
            acc = dev_accuracy(model, enc, args.eval_tokens, args.eval_n, device)
            log(f"dev step {step} @{args.eval_tokens}: " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()))
            t_last = time.time()
        if step % args.save_every == 0:
            save_resume()
    elapsed += time.time() - t_last
    save_resume()
    # what made these weights, written into the checkpoint (the final one and every chunk's snapshot)
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "data_seed": args.seed,
            "init_from": init_meta,  # how the starting weights were made
            "steps": step, "train_seconds": round(elapsed),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if step >= args.max_steps:
        save_checkpoint(ckpt_path, model, args.tokenizer, meta)
        log(f"wrote {ckpt_path} ({os.path.getsize(ckpt_path) / 1e6:.1f} MB) after {step} steps, {elapsed:.0f} s")
    else:
        # a usable fp16 snapshot of every chunk, in case a later chunk never runs
        meta.update(partial_step=step, max_steps=args.max_steps,
                    stopped=f"chunk ended at step {step} of {args.max_steps}; the schedule had not reached its end")
        save_checkpoint(os.path.join(args.out, "tiny_partial.pt"), model, args.tokenizer, meta)
        log(f"chunk done at step {step}/{args.max_steps}; run the same command again to continue")


if __name__ == "__main__":
    main()
