"""`unipeft train / eval / predict / generate / merge / compare`: the main job on the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .cli import app, console
from .errors import UnipeftError
from .run import RunConfig, from_pretrained, read_run, run_tokenizer, train_run


def parse_sets(items: list[str] | None) -> dict:
    """`--set r=16 --set lora.alpha=32 --set targets=[q,v]`: values are read as YAML scalars/lists."""
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UnipeftError(f"--set '{item}' is not KNOB=VALUE (e.g. --set r=16)")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UnipeftError(f"--set '{item}': '{value}' is not a valid value") from None
    return out


def _progress(total: int):
    bar = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("lr {task.fields[lr]:.2e}"),
                   TextColumn("{task.fields[tps]:,.0f} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=console, transient=False)
    task = bar.add_task("train", total=total, loss=float("nan"), lr=0.0, tps=0.0)

    def update(state, loss, lr):
        bar.update(task, completed=state.step, loss=loss, lr=lr, tps=state.tokens / max(state.seconds, 1e-9))

    return bar, update


@app.command()
def train(
    config: Annotated[str | None, typer.Argument(help="A run config YAML (e.g. a previous OUT/config.yaml) or a "
                                                      "method recipe YAML.")] = None,
    model: Annotated[str | None, typer.Option(help="Model folder, or shipped: minilm, smollm2.")] = None,
    task: Annotated[str | None, typer.Option(help="classification | causal-lm (inferred when omitted).")] = None,
    method: Annotated[str | None, typer.Option(help="A preset, a recipe YAML file, or 'full'.")] = None,
    data: Annotated[str | None, typer.Option(help="Shipped dataset (rotten_tomatoes, imdb, shakespeare) or a "
                                                  "train file (.jsonl/.csv/.parquet/.txt).")] = None,
    eval_data: Annotated[str | None, typer.Option(help="Validation file (default: split from --data).")] = None,
    test_data: Annotated[str | None, typer.Option(help="Test file (default: split from --data).")] = None,
    text_column: Annotated[str | None, typer.Option()] = None,
    label_column: Annotated[str | None, typer.Option()] = None,
    prompt_column: Annotated[str | None, typer.Option()] = None,
    response_column: Annotated[str | None, typer.Option()] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default depends on the method).")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per example; longer ones are truncated with a "
                                                        "warning.")] = None,
    schedule: Annotated[str | None, typer.Option(help="linear | cosine | constant (after warmup).")] = None,
    warmup: Annotated[float | None, typer.Option(help="Warmup as a fraction of the steps.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate (and keep the best) every N steps.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    max_eval_examples: Annotated[int | None, typer.Option(help="Evaluate on a fixed seeded subset of this many "
                                                                "validation/test examples (default: all).")] = None,
    out: Annotated[str | None, typer.Option(help="Output folder.")] = None,
    quantize: Annotated[str | None, typer.Option(help="Train adapters on a bitsandbytes-quantized base (QLoRA): "
                                                      "nf4 | fp4 | int8. Needs unipeft\\[quant].")] = None,
    optim: Annotated[str | None, typer.Option(help="adamw | adamw8bit (bitsandbytes 8-bit states).")] = None,
    base_adapters: Annotated[str | None, typer.Option(
        help="Earlier runs (comma-separated folders) whose adapters load frozen next to the new one: sequential "
             "multi-task training without forgetting.")] = None,
    fuse: Annotated[bool, typer.Option(help="Train AdapterFusion over the --base-adapters adapters instead of a new "
                                            "adapter.")] = False,
    accelerate: Annotated[bool, typer.Option(help="Fused base ops (RMSNorm, SwiGLU, RoPE, linear + cross-entropy) "
                                                  "on a CUDA GPU, Llama family. Needs unipeft\\[kernels].")] = False,
    cuda_graphs: Annotated[bool, typer.Option(help="Replay the transformer layers from CUDA graphs (CUDA GPU; "
                                                   "training batches padded to one width).")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Recipe knob override, e.g. --set r=16.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a finished run in --out.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar; one line per evaluation.")] = False,
) -> None:
    """Fine-tune a model with a PEFT method. With no arguments: LoRA on MiniLM for Rotten Tomatoes sentiment."""
    cfg = RunConfig()
    if config is not None:
        text = Path(config).read_text(encoding="utf-8") if Path(config).is_file() else None
        if text is None:
            raise UnipeftError(f"config file '{config}' does not exist")
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise UnipeftError(f"config file '{config}' is not valid YAML: {str(e).splitlines()[0]}") from None
        if isinstance(loaded, dict) and ("parts" in loaded or "function" in loaded):
            cfg.method = config  # a method recipe
        else:
            cfg = RunConfig.from_file(config)
    flags = {"model": model, "task": task, "method": method, "data": data, "eval_data": eval_data,
             "test_data": test_data, "text_column": text_column, "label_column": label_column,
             "prompt_column": prompt_column, "response_column": response_column, "epochs": epochs,
             "max_steps": max_steps, "lr": lr, "batch_size": batch_size, "grad_accum": grad_accum,
             "max_length": max_length, "schedule": schedule, "warmup": warmup, "eval_every": eval_every,
             "save_every": save_every, "seed": seed, "max_eval_examples": max_eval_examples, "out": out,
             "quantize": quantize, "optim": optim,
             "base_adapters": [r.strip() for r in base_adapters.split(",") if r.strip()] if base_adapters else None,
             "fuse": fuse or None, "accelerate": accelerate or None, "cuda_graphs": cuda_graphs or None}
    for k, v in flags.items():
        if v is not None:
            setattr(cfg, k, v)
    if data == "shakespeare" and model is None and config is None:  # MiniLM has no LM head: the shipped LM
        cfg.model = "smollm2"
    cfg.overrides = {**cfg.overrides, **parse_sets(set_)}

    def log(message: str) -> None:
        if not quiet or message.startswith("warning"):
            console.print(message, markup=False)

    ignored = [k for k, v in flags.items() if v is not None and k != "out"] + (["set"] if set_ else [])
    resumable = resume and (Path(cfg.out) / "checkpoint.pt").is_file() and (Path(cfg.out) / "config.yaml").is_file()
    if resumable and (ignored or config is not None):  # (a resumed run continues exactly its own config.yaml)
        what = ", ".join(f"--{k.replace('_', '-')}" for k in ignored) or "the config file"
        log(f"warning: --resume continues the run's own config.yaml; {what} not used (start again with "
            "--overwrite to change settings)")

    if not quiet:
        console.print(f"unipeft train: {cfg.method} on {cfg.model}, data {cfg.data} → {cfg.out}")
    bar = None

    def progress_factory(total: int):
        nonlocal bar
        if quiet:
            return None
        bar, update = _progress(total)
        bar.start()
        return update

    try:
        results = train_run(cfg, resume=resume, overwrite=overwrite, log=log, progress_factory=progress_factory)
    finally:
        if bar is not None:
            bar.stop()
    s = results["summary"]
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in results["test"].items())
    console.print(f"test: {metrics} | {s['trainable_parameters']:,} trainable ({s['trainable_percent']:.3f}%) | "
                  f"{s['tokens_per_s']:,.0f} tok/s | {s['wall_seconds']:.0f} s | results in {cfg.out}/results.json",
                  highlight=False)


@app.command("eval")
def eval_cmd(
    run: Annotated[str, typer.Argument(help="A finished run folder.")],
    data: Annotated[str | None, typer.Option(help="Shipped dataset or file (default: the run's test split).")] = None,
    out: Annotated[str, typer.Option(help="Where to write results.json (never the run folder).")] = "eval_out",
    text_column: Annotated[str | None, typer.Option(help="--data's text column (default: the run's).")] = None,
    label_column: Annotated[str | None, typer.Option(help="--data's label column (default: the run's).")] = None,
) -> None:
    """Evaluate a run on data; writes {"test": {...}} to --out/results.json."""
    from .data import load_splits
    from .run import _subset, _write_atomic, encode, is_run_folder
    from .train import evaluate

    cfg, run_dir = read_run(run)
    cfg.text_column, cfg.label_column = text_column or cfg.text_column, label_column or cfg.label_column
    target = Path(out)
    if target.resolve() == run_dir.resolve():
        raise UnipeftError("--out must not be the run folder (its results.json stays the training run's)")
    if is_run_folder(target) or any(is_run_folder(p) for p in target.resolve().parents):
        raise UnipeftError(f"--out '{out}' is (inside) a training run folder; choose a separate folder")
    model = from_pretrained(run_dir)
    tok = run_tokenizer(run_dir)
    if data is None:
        splits = load_splits(cfg.data, cfg.eval_data, cfg.test_data, cfg.task, cfg.columns(), cfg.seed,
                             cfg.label_names)
    else:
        splits = load_splits(data, data, data, cfg.task, cfg.columns(), cfg.seed, cfg.label_names)
    *_, test, _ = encode(cfg, splits, tok)
    if data is None and cfg.max_eval_examples:  # the run's own test subset, as in its results.json
        test = _subset(test, cfg.max_eval_examples, cfg.seed)
    metrics = evaluate(model, test, cfg.task, tok.pad_token_id)
    target.mkdir(parents=True, exist_ok=True)
    _write_atomic(target / "results.json", json.dumps({"test": metrics}, indent=2))
    console.print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" → {target}/results.json")


@app.command()
def predict(
    run: Annotated[str, typer.Argument(help="A finished classification run folder.")],
    texts: Annotated[list[str], typer.Argument(help="Texts to classify.")],
) -> None:
    """Classify texts with a run's adapter: the label and its probability."""
    import torch

    cfg, run_dir = read_run(run)
    if cfg.task != "classification":
        raise UnipeftError(f"'{run}' is a {cfg.task} run; use `unipeft generate`")
    model, tok = from_pretrained(run_dir), run_tokenizer(run_dir)
    device = next(model.parameters()).device
    enc = tok(texts, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt").to(device)
    with torch.no_grad():
        probs = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float().softmax(-1)
    for text, p in zip(texts, probs):
        i = int(p.argmax())
        print(f"{cfg.label_names[i]}\t{float(p[i]):.3f}\t{text}")  # tab-separated: label, probability, text


@app.command()
def generate(
    run: Annotated[str, typer.Argument(help="A finished causal-LM run folder.")],
    prompts: Annotated[list[str], typer.Argument(help="Prompts.")],
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    chat: Annotated[bool | None, typer.Option(help="Use the chat template (default: when the run trained on "
                                                   "prompt/response data).")] = None,
) -> None:
    """Generate text (greedy) with a causal-LM run's adapter."""
    import torch

    if max_new_tokens < 1:
        raise UnipeftError("--max-new-tokens must be >= 1")
    cfg, run_dir = read_run(run)
    if cfg.task != "causal-lm":
        raise UnipeftError(f"'{run}' is a {cfg.task} run; use `unipeft predict`")
    model, tok = from_pretrained(run_dir), run_tokenizer(run_dir)
    use_chat = chat if chat is not None else bool(cfg.chat)  # default: how the run was trained
    device = next(model.parameters()).device
    for prompt in prompts:
        if use_chat:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            if ids.shape[1] == 0:  # (a plain model has no BOS to start from)
                raise UnipeftError("a prompt is empty; give some text to continue (or --chat)")
        ids = ids.to(device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        print(prompt + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


@app.command()
def merge(
    run: Annotated[str, typer.Argument(help="A finished run folder.")],
    to: Annotated[str, typer.Option("--to", help="Folder for the merged plain transformers model.")],
) -> None:
    """Merge a run's adapter into the weights and save a plain transformers model (no unipeft needed to load it)."""
    from .fsutil import atomic_folder
    from .run import is_run_folder

    cfg, run_dir = read_run(run)
    target = Path(to)
    if target.exists() and any(target.iterdir()):
        raise UnipeftError(f"--to '{to}' is not empty; choose a new folder")
    if any(is_run_folder(p) for p in target.resolve().parents):
        raise UnipeftError(f"--to '{to}' is inside a training run folder; choose a separate folder")
    if cfg.method == "full":
        raise UnipeftError(f"'{run}' is a full fine-tune: its model/ folder already is a plain transformers model")
    am = from_pretrained(run_dir)
    recipe = am.recipes["default"]
    if cfg.quantize:  # QLoRA: merge exactly into the dequantized weights; the result is a plain float model
        model = am.merge_dequantized()
    else:
        am.merge()  # a non-mergeable recipe raises its one-line reason here, before anything is written
        model = am.detach()
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        run_tokenizer(run_dir).save_pretrained(tmp)
    console.print(f"merged {recipe.name} into {type(model).__name__} → {target} (load with "
                  "transformers' from_pretrained)")


@app.command()
def compare(
    data: Annotated[str, typer.Option(help="Shipped dataset or train file.")] = "rotten_tomatoes",
    methods: Annotated[str, typer.Option(help="Comma-separated methods; 'full' is the reference.")] =
    "full,lora,houlsby,pfeiffer,parallel,scaled_parallel,prefix,ia3,mam",
    model: Annotated[str, typer.Option()] = "minilm",
    seeds: Annotated[int, typer.Option(help="Seeds per method (0..N-1).")] = 1,
    max_steps: Annotated[int | None, typer.Option()] = None,
    epochs: Annotated[int, typer.Option()] = 1,
    batch_size: Annotated[int, typer.Option()] = 32,
    out: Annotated[str, typer.Option()] = "runs/compare",
    text_column: Annotated[str, typer.Option()] = "text",
    label_column: Annotated[str, typer.Option()] = "label",
    overwrite: Annotated[bool, typer.Option()] = False,
) -> None:
    """Train several methods on one task; write a table (compare.md/json) and a plot (metric vs % trainable)."""
    from .compare import run_compare

    run_compare(data=data, methods=[m.strip() for m in methods.split(",") if m.strip()], model=model, seeds=seeds,
                max_steps=max_steps, epochs=epochs, batch_size=batch_size, out=Path(out), overwrite=overwrite,
                console=console, columns={"text_column": text_column, "label_column": label_column})
