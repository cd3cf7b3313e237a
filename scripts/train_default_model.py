"""Train the default model pair (target + draft) shipped in engine/default_model/.

    PYTHONPATH=$PWD python scripts/train_default_model.py measure   # tokens/s of each shape
    PYTHONPATH=$PWD python scripts/train_default_model.py prepare   # corpus, tokenizer, token stream
    PYTHONPATH=$PWD python scripts/train_default_model.py target --stable-steps 700
    PYTHONPATH=$PWD python scripts/train_default_model.py draft --stable-steps 800

Steps, all deterministic (fixed seeds, one CPU thread, fixed step counts):

1. corpus: ``scripts/default_model_corpus.py`` (the Python standard library of
   this interpreter, split by document into train and held-out); the held-out
   text is written to ``engine/default_model/heldout.txt``;
2. tokenizer: byte-level BPE on the training text (``train_bpe_tokenizer``,
   special tokens and chat template of the default model, ids 0..4);
3. data: each training document as ``<s>`` + its tokens; pydoc topics and
   docstrings also as one ChatML exchange each (a question naming the topic
   or function, the text as the answer), so the chat template leads to prose;
4. models: ``transformers.LlamaForCausalLM`` (tied embeddings), AdamW,
   random windows of ``SEQ_LEN + 1`` tokens, bf16 autocast; saved as a
   standard Llama checkpoint in bf16. The learning rate warms up, stays
   constant for ``stable_steps`` and decays (cosine) over a fifth as many
   more. The machine's load decides how many steps fit a wall-clock budget,
   so the stable phase can be ended early by creating ``build/default-model/
   stop-<name>``; the record keeps the step it ended at, and
   ``--stable-steps`` with that number replays the same run exactly.

``prepare`` caches the tokenizer and token streams in ``build/default-model/``
(both trainings, which may run in parallel, read them).

The loss curve, held-out loss, sizes, seconds and corpus digests go to
``bench-results/default-model-training.json``. Continuous integration never
runs this; the checkpoints it wrote are committed.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import default_model_corpus as corpus  # noqa: E402

from splitserve.engine import default_model as dm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "bench-results" / "default-model-training.json"
WORK = ROOT / "build" / "default-model"
VOCAB_SIZE = 4096
SEQ_LEN = 256
SEED = 0
FOLDERS = {"target": dm.DEFAULT_MODEL_NAME, "draft": dm.DEFAULT_DRAFT_NAME}


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


@dataclass(frozen=True)
class Recipe:
    shape: Shape
    stable_steps: int  # at most: a stop file ends the stable phase earlier
    batch: int  # sequences of SEQ_LEN tokens per step
    lr: float
    warmup: int
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.05
    decay_fraction: float = 0.2  # decay steps per stable step

    def decay_steps(self, stable: int) -> int:
        return max(1, round(self.decay_fraction * stable))


RECIPES = {
    # ~5.8M parameters (a 384-wide, 11M one ran at half the tokens/s: fewer
    # tokens in the same time); 4096 tokens a step
    "target": Recipe(Shape(hidden=256, layers=6, heads=8, kv_heads=4, intermediate=768),
                     stable_steps=1250, batch=16, lr=2e-3, warmup=50),
    # ~0.9M parameters, ~3x the target's tokens/s
    "draft": Recipe(Shape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=384),
                    stable_steps=1250, batch=16, lr=3e-3, warmup=50),
}


# -- data -------------------------------------------------------------------------------
def _chat(question: str, answer: str) -> str:
    return (f"{dm.IM_START}user\n{question}{dm.IM_END}\n"
            f"{dm.IM_START}assistant\n{answer.strip()}{dm.IM_END}\n")


def chat_documents(docs: list[corpus.Document]) -> list[str]:
    """One ChatML exchange per pydoc topic and per documented module, class
    and function of the training documents."""
    out = []
    for d in docs:
        if "#" in d.name:
            out.append(_chat(f"Explain {d.name.split('#')[1].replace('-', ' ')} in Python.", d.text))
            continue
        if not d.name.endswith(".py"):
            continue
        module = d.name[:-3].replace("/", ".").removesuffix(".__init__")
        try:
            tree = ast.parse(d.text)
        except SyntaxError:
            continue
        if (doc := ast.get_docstring(tree)) and len(doc) > 80:
            out.append(_chat(f"What is the {module} module for?", doc))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80 and not node.name.startswith("_"):
                    out.append(_chat(f"What does {module}.{node.name} do?", doc))
    return out


def token_stream(tok, docs: list[corpus.Document]) -> torch.Tensor:
    texts = [d.text for d in docs] + chat_documents(docs)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):  # the post-processor puts <s> first
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.int16 if VOCAB_SIZE < 2**15 else torch.int32)


def windows(stream: torch.Tensor, gen: torch.Generator, batch: int) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (batch,), generator=gen)
    return torch.stack([stream[s:s + SEQ_LEN + 1] for s in starts.tolist()]).long()  # [B, T+1]


# -- model ------------------------------------------------------------------------------
def hf_config(shape: Shape, vocab: int, eos_ids: list[int]) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads, "head_dim": shape.hidden // shape.heads,
        "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": True,
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
        "bos_token_id": 0, "eos_token_id": eos_ids, "torch_dtype": "bfloat16",
    }


def build_model(cfg: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    c = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    c._attn_implementation = "sdpa"
    return LlamaForCausalLM(c)


def lr_at(r: Recipe, step: int, stable: int | None) -> float:
    """Warm-up, constant until ``stable`` (None: not yet decided), cosine decay."""
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    if stable is None or step < stable:
        return r.lr
    t = (step - stable) / r.decay_steps(stable)
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def loss_on(model, batch: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             batch[:, 1:].reshape(-1))


@torch.no_grad()
def eval_loss(model, stream: torch.Tensor, max_windows: int = 32) -> float:
    model.eval()
    n = min(max_windows, (len(stream) - 1) // SEQ_LEN)
    batch = torch.stack([stream[i * SEQ_LEN:i * SEQ_LEN + SEQ_LEN + 1] for i in range(n)]).long()
    losses = [loss_on(model, batch[i:i + 8]).item() for i in range(0, n, 8)]
    model.train()
    return sum(losses) / len(losses)


def train(name: str, r: Recipe, cfg: dict, stream: torch.Tensor, held: torch.Tensor,
          stable: int | None = None, log_every: int = 10, eval_every: int = 100) -> tuple[object, dict]:
    """``stable``: the stable phase's length if known (a replay), else up to
    ``r.stable_steps``, ended early by the stop file."""
    model = build_model(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=r.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(SEED + 1)
    curve, evals, t0 = [], [], time.perf_counter()
    stop = WORK / f"stop-{name}"
    step = 0
    while stable is None or step < stable + r.decay_steps(stable):
        if stable is None and step >= r.warmup and (step >= r.stable_steps or stop.exists()):
            stable = step
            print(f"{name}: stable phase ends at step {stable}; decay for {r.decay_steps(stable)}", flush=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(r, step, stable)
        loss = loss_on(model, windows(stream, gen, r.batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = stable is not None and step == stable + r.decay_steps(stable) - 1
        if step % log_every == 0 or last:
            curve.append({"step": step, "loss": round(loss.item(), 4), "lr": round(lr_at(r, step, stable), 6),
                          "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{name} step {step} loss {loss.item():.3f} {curve[-1]['seconds']}s", flush=True)
        if (step + 1) % eval_every == 0 or last:
            evals.append({"step": step + 1, "heldout_loss": round(eval_loss(model, held), 4)})
            print(f"{name} held-out loss {evals[-1]['heldout_loss']:.3f}", flush=True)
        step += 1
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return model, {"recipe": asdict(r), "stable_steps": stable, "steps": step, "seq_len": SEQ_LEN,
                   "parameters": params, "train_seconds": round(seconds, 1), "cpu_seconds": round(time.process_time(), 1),
                   "tokens_seen": step * r.batch * SEQ_LEN, "loss_curve": curve, "heldout_eval": evals}


def save(model, cfg: dict, tok, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}  # tied to model.embed_tokens.weight
    save_file(dict(sorted(state.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    dm.write_tokenizer_files(out, tok)
    cfg = {k: v for k, v in cfg.items() if k != "initializer_range"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": cfg["eos_token_id"]}, indent=2, sort_keys=True) + "\n")


# -- commands ---------------------------------------------------------------------------
def prepare(cached: bool = True):
    """(tokenizer, train stream, held-out ids, held-out text, corpus info),
    from ``WORK`` when ``cached`` and it is there."""
    from tokenizers import Tokenizer

    if cached and (WORK / "info.json").exists():
        info = json.loads((WORK / "info.json").read_text())
        return (Tokenizer.from_file(str(WORK / "tokenizer.json")), torch.load(WORK / "stream.pt"),
                torch.load(WORK / "heldout.pt"), (WORK / "heldout.txt").read_text(encoding="utf-8"), info)
    t0 = time.perf_counter()
    train_docs, held_docs = corpus.split(corpus.collect())
    train_text, held_text = corpus.join(train_docs), corpus.join(held_docs)
    tok = dm.train_bpe_tokenizer(train_text, VOCAB_SIZE)
    stream, held = token_stream(tok, train_docs), torch.tensor(tok.encode(held_text).ids)
    info = {"python": sys.version.split()[0], "stdlib": str(corpus.stdlib_root()),
            "train_documents": len(train_docs), "train_bytes": len(train_text.encode()),
            "train_sha256": corpus.digest(train_text), "train_tokens_with_chat": len(stream),
            "heldout_documents": [d.name for d in held_docs], "heldout_bytes": len(held_text.encode()),
            "heldout_sha256": corpus.digest(held_text), "heldout_tokens": len(held),
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "prepare_seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps({k: v for k, v in info.items() if k != "heldout_documents"}), flush=True)
    WORK.mkdir(parents=True, exist_ok=True)
    tok.save(str(WORK / "tokenizer.json"))
    torch.save(stream, WORK / "stream.pt")
    torch.save(held, WORK / "heldout.pt")
    (WORK / "heldout.txt").write_text(held_text, encoding="utf-8")
    (WORK / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    return tok, stream, held, held_text, info


def measure(shapes: list[str], steps: int) -> None:
    tok, stream, held, _, _ = prepare()
    eos = [tok.token_to_id(dm.EOS), tok.token_to_id(dm.IM_END)]
    for name in shapes:
        r = RECIPES[name]
        r = Recipe(r.shape, stable_steps=steps, batch=r.batch, lr=r.lr, warmup=2, decay_fraction=0)
        _, rec = train(name, r, hf_config(r.shape, tok.get_vocab_size(), eos), stream, held,
                       stable=steps - 1, log_every=1, eval_every=10**9)
        per_step = (rec["loss_curve"][-1]["seconds"] - rec["loss_curve"][1]["seconds"]) / (steps - 2)
        print(f"{name}: {rec['parameters']} parameters, {per_step:.2f} s/step, "
              f"{r.batch * SEQ_LEN / per_step:.0f} tokens/s", flush=True)


def run(names: list[str], stable: int | None) -> None:
    tok, stream, held, held_text, info = prepare()
    eos = [tok.token_to_id(dm.EOS), tok.token_to_id(dm.IM_END)]
    dm.HELDOUT_PATH.write_text(held_text, encoding="utf-8")
    for name in names:
        r = RECIPES[name]
        cfg = hf_config(r.shape, tok.get_vocab_size(), eos)
        model, rec = train(name, r, cfg, stream, held, stable)
        save(model, cfg, tok, dm.PACKAGE_DIR / FOLDERS[name])
        # read just before writing: the two models may train in parallel processes
        record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
        record.update({"what": "training of the default model pair (scripts/train_default_model.py)",
                       "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "machine": _cpu_name(), "corpus": info, name: rec})
        RECORD.write_text(json.dumps(record, indent=1) + "\n")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("measure", "prepare", "target", "draft"))
    ap.add_argument("--steps", type=int, default=12, help="measure: steps per shape")
    ap.add_argument("--stable-steps", type=int, default=None,
                    help="length of the constant-rate phase (replays a recorded run); "
                         "default: the recipe's, or until build/default-model/stop-NAME exists")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the machine is shared; also makes runs bit-reproducible
    if args.command == "measure":
        measure(list(RECIPES), args.steps)
    elif args.command == "prepare":
        prepare(cached=False)
    else:
        run([args.command], args.stable_steps)


if __name__ == "__main__":
    main()
