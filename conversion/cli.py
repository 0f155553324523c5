"""The ``vitx`` command line: convert, parity, classify, predict, finetune, attention, export, info (docs/cli.md).

Exit codes: 0 success; 1 ``parity`` found a pair over the tolerance, or an ``export`` failed its
validation (nothing written); 2 bad input (unknown or
corrupt checkpoint, refused variant, destination exists, missing file, bad option), reported as
one ``vitx: error: ...`` line without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from vit_core.checkpoint import CheckpointError

EXIT_OK, EXIT_PARITY_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitx", description="ViT checkpoints in PyTorch, TensorFlow and Flax: convert, prove parity, classify.")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or notes")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .convert import TARGETS

    p = sub.add_parser("convert", help="convert a checkpoint to another format",
                       description="Convert any supported checkpoint (transformers PT/TF/Flax, timm, JAX npz, "
                                   "big_vision npz; detected from its contents) to another format. Every format's "
                                   "names and layouts: docs/FORMATS.md; what is read, refused and written: "
                                   "docs/checkpoints.md.")
    p.add_argument("src", help="checkpoint directory, weights file or hub id")
    p.add_argument("dst", help="output directory (or file for --to timm/jax/big_vision with a .safetensors/.npz name)")
    p.add_argument("--to", default="safetensors", choices=TARGETS, help="target format (default: safetensors)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing destination that holds only checkpoint files (swapped in atomically)")
    p.add_argument("--force-all", action="store_true",
                   help="replace an existing destination whatever it holds (its other files are deleted)")
    p.add_argument("--timm-model", help="timm model name (e.g. vit_base_patch16_224) fixing a timm state dict's config")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = sub.add_parser("parity", help="run a checkpoint in every framework and compare outputs",
                       description="Load the checkpoint in each installed framework, feed identical pixel values, "
                                   "print max |diff| per output per framework pair. Exit 1 over the tolerance. "
                                   "Without CHECKPOINT: a built-in ViT-B/16 with seeded weights and bundled photos. "
                                   "The bounds: docs/NUMERICS.md.")
    p.add_argument("checkpoint", nargs="?", help="checkpoint (default: built-in seeded ViT-B/16)")
    p.add_argument("--images", nargs="+", help="image files (default: the bundled sample photos)")
    p.add_argument("--frameworks", nargs="+", type=_framework_list, default=[["torch", "tf", "flax"]],
                   help="frameworks to compare, space- or comma-separated: torch tf flax reference "
                        "(default: torch tf flax)")
    p.add_argument("--atol", type=float, help="max |diff| allowed (default: docs/NUMERICS.md bound for the model)")
    p.add_argument("--layers", action="store_true", help="compare every hidden state, name the first diverging layer")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--timm-model", help="timm model name for a timm state dict")
    p.add_argument("--perturb", action="append", metavar="FRAMEWORK:KEY[=DELTA]",
                   help="add DELTA (default 1e-2) to the first element of one canonical weight in one framework's copy: shows the "
                        "report catches a corrupted weight")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = sub.add_parser("classify", help="top-k labels of images",
                       description="Classify images with a checkpoint that has a classifier head, as transformers' "
                                   "image-classification pipeline (softmax scores; sigmoids for multi-label). "
                                   "See docs/cli.md.")
    p.add_argument("checkpoint", help="checkpoint with a classifier head: directory, weights file or hub id")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (preprocessed with the checkpoint's image processor)")
    p.add_argument("--framework", default="torch", choices=["torch", "tf", "flax"],
                   help="framework that runs the model (default: torch)")
    p.add_argument("--top-k", type=int, default=5, help="labels shown per image, best first (default: 5)")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.add_argument("--timm-model", help="timm model name for a timm state dict")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = sub.add_parser(
        "predict", help="batch inference over many images to a .jsonl or .parquet file (resumable, shardable)",
        description="Classify (and embed) every image of INPUT... with CHECKPOINT: one output row per input, in a stable "
                    'order: {"path", "label", "score", "top_k": [[label, score], ...]} (+ "embedding" with --embeddings), '
                    'or {"path", "error"} for a file that cannot be read. Decoding and preprocessing run in --workers '
                    "processes overlapped with the model, with a bounded number of batches in flight (flat memory). Rows are "
                    "appended and fsynced per batch: a killed run loses only the batches in flight and --resume completes "
                    "the file. See docs/predict.md.")
    p.add_argument("checkpoint", help="checkpoint directory, weights file or hub id (any format vitx reads)")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (walked recursively, sorted per folder) or .txt files listing paths")
    p.add_argument("--output", required=True, metavar="FILE",
                   help="FILE.jsonl or FILE.parquet (refused if it exists, unless --resume)")
    p.add_argument("--framework", default="torch", choices=["torch", "tf", "flax"],
                   help="framework that runs the model (default: torch)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward call (default: 32)")
    p.add_argument("--top-k", type=int, default=5, help="labels per row, best first (default: 5)")
    p.add_argument("--embeddings", action="store_true",
                   help="add the final-layernormed CLS vector as \"embedding\" (required for a checkpoint without a "
                        "classifier head: its rows hold the embedding only)")
    p.add_argument("--workers", type=int, default=2,
                   help="processes decoding and preprocessing images; 0: in the main process (default: 2). With --ray: "
                        "the size of the actor pool")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="only every N-th input, starting from the I-th (0-based; default: 0/1, all)")
    p.add_argument("--resume", action="store_true",
                   help="complete an existing --output: skip the rows already written (a partial last line is cut off)")
    p.add_argument("--ray", action="store_true",
                   help="run on Ray Data (map_batches on an actor pool holding the model) on the cluster ray.init() finds, "
                        "or a local one; needs vitx[ray]")
    p.add_argument("--timm-model", help="timm model name for a timm state dict")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = sub.add_parser(
        "finetune", help="fine-tune a checkpoint on a folder of images (or a saved datasets dataset)",
        description="Fine-tune CHECKPOINT's backbone with a new classification head on DATA, in one framework. DATA: a folder "
                    "with one sub-folder per class (labels = sorted folder names), or a datasets dataset saved with "
                    "save_to_disk (columns image and label). AdamW, linear warm-up then cosine decay, random-resized-crop + "
                    "flip augmentation, validation every epoch, an atomic checkpoint after every epoch (--resume continues "
                    "it). OUTPUT ends as config.json, model.safetensors, preprocessor_config.json and metrics.json, loadable "
                    "by vit_torch, vit_tf, vit_flax and transformers. See docs/training.md.")
    p.add_argument("data", metavar="DATA", help="folder of class folders, or a saved datasets dataset")
    p.add_argument("--model", required=True, metavar="CHECKPOINT",
                   help="checkpoint to start from (any format vitx reads: directory, weights file, hub id)")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory (must be new or empty, unless --resume)")
    p.add_argument("--framework", default="torch", choices=["torch", "tf", "flax"], help="framework that trains (default: torch)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=3, help="passes over the training images (default: 3)")
    length.add_argument("--max-steps", type=int, help="optimizer steps in all (instead of --epochs)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images per optimizer step of one worker (default: 8); N data-parallel workers (--nproc, "
                        "torchrun, TF_CONFIG, several devices) take global batches of N * batch-size images")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default: 5e-5)")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW decoupled weight decay, not applied to biases and LayerNorm (default: 0)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps before the cosine decay (default: 0)")
    p.add_argument("--image-size", type=int, help="train at this resolution (the position table is resampled once at load)")
    p.add_argument("--val-split", type=float, default=0.1,
                   help="fraction of each class held out for validation, drawn from --seed (default: 0.1; a dataset's own "
                        "validation split is used where it has one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the shuffle, the crops, dropout and a new head (default: 0)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no random-resized crop and flip")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="the same image order every epoch")
    p.add_argument("--log", metavar="FILE.jsonl", help='append one JSON line per optimizer step: {"step", "loss", "lr", "epoch"}')
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last finished epoch")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (bfloat16: torch autocast, Keras mixed_bfloat16, Flax dtype; weights stay float32)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass (less memory)")
    p.add_argument("--workers", type=int, default=2, help="threads decoding and augmenting images (default: 2)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="start N local data-parallel worker processes with the framework's launcher (torch: torchrun "
                        "--standalone; flax: jax.distributed; tf: TF_CONFIG + MultiWorkerMirroredStrategy), all on "
                        "127.0.0.1 (default: 1)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard parameters and optimizer state over the workers (torch: FSDP2 fully_shard under "
                        "torchrun or --nproc; flax: along the device mesh's data axis)")
    p.add_argument("--coordinator-address", metavar="HOST:PORT",
                   help="flax: the jax.distributed coordinator (process 0's address); with --num-processes and --process-id")
    p.add_argument("--num-processes", type=int, metavar="N", help="flax: processes in the jax.distributed run")
    p.add_argument("--process-id", type=int, metavar="I", help="flax: this process's index in [0, N)")
    p.add_argument("--collective-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="seconds the workers wait for each other (first meeting and each collective) before the run "
                        "fails (default: 600)")
    p.add_argument("--stop-after-steps", type=int, metavar="N",
                   help="stop after N optimizer steps of this invocation, as if interrupted (exit code 130; the last "
                        "finished epoch's checkpoint stays for --resume)")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress bars or notes")

    from .attention import METHODS

    p = sub.add_parser(
        "attention", help="attention maps of images: an overlay PNG and the raw map (.npy) per image",
        description="Per image, the attention map of CHECKPOINT's CLS token over the patches: OUTPUT/<stem>.<method>.png "
                    "(the photo at its original size with the upsampled, coloured map blended over it) and "
                    "OUTPUT/<stem>.<method>.npy (the raw (grid height, grid width) float32 map). Existing files are "
                    "refused unless --overwrite; every file is written atomically. See docs/attention.md.")
    p.add_argument("checkpoint", help="checkpoint directory, weights file or hub id (any format vitx reads)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (preprocessed with the checkpoint's image processor)")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--method", default="rollout", choices=METHODS,
                   help="rollout: attention rollout through every layer (Abnar & Zuidema 2020); last-layer: the last "
                        "layer's CLS attention (default: rollout)")
    p.add_argument("--head", type=_head, default="mean", metavar="mean|N",
                   help="--method last-layer: the mean over the heads or head N (default: mean)")
    p.add_argument("--head-fusion", default="mean", choices=["mean", "max", "min"],
                   help="--method rollout: how each layer's heads are fused (default: mean)")
    p.add_argument("--discard-ratio", type=float, default=0.0, metavar="F",
                   help="--method rollout: fraction in [0, 1) of each layer's lowest fused weights set to zero, the "
                        "CLS-to-CLS weight excepted (default: 0)")
    p.add_argument("--framework", default="torch", choices=["torch", "tf", "flax"],
                   help="framework that runs the model (default: torch; all three give the same map to 1e-5)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--timm-model", help="timm model name for a timm state dict")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    from .export import DTYPES, EXPORT_FRAMEWORKS, FORMATS, QUANTIZE_METHODS

    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX, a SavedModel, jax.export or OpenVINO IR, validated",
        description="Export CHECKPOINT to OUT_DIR as a deployable model with its config.json and "
                    "preprocessor_config.json: --format onnx (model.onnx and the fused model.optimized.onnx), "
                    "saved_model (saved_model/ with a serving_default signature), jax (model.jax, a serialised "
                    "jax.export) or openvino (model.xml + model.bin). Input pixel_values (batch, channels, height, "
                    "width) float32 with a dynamic batch. The export is run by its runtime on the bundled photos at "
                    "batch 1 and 5 and compared with the source framework: max |diff| is printed; over the bound "
                    "(1e-4 in float32, docs/NUMERICS.md) nothing is written and the exit code is 1. See docs/deploy.md.")
    p.add_argument("checkpoint", help="checkpoint directory, weights file or hub id (any format vitx reads)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must not exist unless --force)")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--framework", choices=EXPORT_FRAMEWORKS,
                   help="source framework (default: torch; tf for saved_model, flax for jax)")
    p.add_argument("--opset", type=int, help="ONNX opset, 17 to 23 (default: 23 from torch and flax, 18 from tf)")
    p.add_argument("--dynamic-size", action="store_true",
                   help="dynamic height and width too, the position table resampled in the graph (--framework torch)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="model dtype (input and outputs stay float32); refused where the runtime cannot run it")
    p.add_argument("--quantize", choices=QUANTIZE_METHODS, help="also write an int8 model (onnx / openvino)")
    p.add_argument("--calibration", metavar="IMAGE_DIR", help="images that calibrate --quantize int8-static")
    p.add_argument("--force", action="store_true", help="replace an existing OUT_DIR that holds only export files")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--timm-model", help="timm model name for a timm state dict")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = sub.add_parser("info", help="format, config, parameter count, labels of a checkpoint",
                       description="Detect a checkpoint's format from its contents (docs/FORMATS.md) and print its "
                                   "config, parameter count, dtypes and labels, without building a model.")
    p.add_argument("checkpoint", help="checkpoint directory, weights file or hub id (any format vitx reads)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument("--timm-model", help="timm model name for a timm state dict")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _framework_list(text: str) -> list[str]:
    """One --frameworks argument: a name or a comma-separated list of names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no framework named in {text!r}")
    return names


def _shard(text: str) -> tuple[int, int]:
    """One --shard argument: I/N with 0 <= I < N."""
    from .predict import parse_shard

    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--shard {text!r}: ")) from None


def _head(text: str) -> str | int:
    """One --head argument: "mean" or a head index."""
    if text == "mean":
        return "mean"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'mean' or a head index, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a head index is >= 0, got {value}")
    return value


def _setup_quiet(quiet: bool) -> None:
    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING, format="vitx: %(message)s")
    for name in ("vitx", "vitx.conversion", "vitx.checkpoint"):
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.WARNING)
    from vit_core.quiet import install_quiet_tensorflow_hook  # TF_CPP_MIN_LOG_LEVEL=2 unless set; no TF start-up lines
    install_quiet_tensorflow_hook()
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    result = convert(args.src, args.dst, to=args.to, force=args.force or args.force_all, force_all=args.force_all,
                     timm_model_name=args.timm_model,
                     progress=not args.quiet)
    if not args.quiet:
        print(f"{result.source_format} -> {result.target}: wrote {result.path} "
              f"({result.nbytes / 2**20:.1f} MiB of tensors in {result.seconds:.1f} s)")
    return EXIT_OK


def _cmd_parity(args: argparse.Namespace) -> int:
    from .compare import compare

    perturb: dict[str, str] = {}
    for spec in args.perturb or []:
        framework, sep, rest = spec.partition(":")
        if not sep or not rest:
            raise ValueError(f"--perturb {spec!r}: expected FRAMEWORK:KEY[=DELTA]")
        perturb[framework] = rest
    report = compare(args.checkpoint, images=args.images, frameworks=[n for group in args.frameworks for n in group], layers=args.layers,
                     atol=args.atol, timm_model_name=args.timm_model, perturb=perturb or None)
    print(report.to_json() if args.json else report.to_table())
    return EXIT_OK if report.ok else EXIT_PARITY_FAILED


def _cmd_classify(args: argparse.Namespace) -> int:
    from .pipeline import pipeline

    classify = pipeline("image-classification", model=args.checkpoint, framework=args.framework, top_k=args.top_k,
                        timm_model_name=args.timm_model)
    results = classify(list(args.images))
    if args.json:
        print(json.dumps({str(image): preds for image, preds in zip(args.images, results)}, indent=2))
        return EXIT_OK
    for image, predictions in zip(args.images, results):
        print(f"{image}:")
        for p in predictions:
            print(f"  {p['score']:.4f}  {p['label']}")
    return EXIT_OK


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import PredictOptions, predict

    result = predict(PredictOptions(
        checkpoint=args.checkpoint, inputs=list(args.inputs), output=args.output, framework=args.framework,
        batch_size=args.batch_size, top_k=args.top_k, embeddings=args.embeddings, workers=args.workers,
        shard=args.shard, resume=args.resume, ray=args.ray, timm_model_name=args.timm_model,
        progress=not args.quiet))
    if not args.quiet:
        kept = f", {result.skipped} already there" if result.skipped else ""
        errors = f", {result.errors} unreadable" if result.errors else ""
        print(f"{result.output}: {result.written} rows written{kept}{errors} in {result.seconds:.1f} s")
    return EXIT_OK


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune, launch_from_args, options_from_args

    if args.nproc > 1:
        return launch_from_args(args, args.argv)
    result = finetune(options_from_args(args))
    if args.quiet:
        return EXIT_OK
    accuracy = result.metrics.get("val_accuracy")
    shown = "" if accuracy is None else f", validation accuracy {accuracy:.4f}"
    print(f"{result.output}: {result.steps} steps{shown}")
    return EXIT_OK


def _cmd_attention(args: argparse.Namespace) -> int:
    from .attention import run_attention

    run_attention(args.checkpoint, list(args.images), args.output, method=args.method, head=args.head,
                  discard_ratio=args.discard_ratio, head_fusion=args.head_fusion, framework=args.framework,
                  overwrite=args.overwrite, timm_model_name=args.timm_model, progress=not args.quiet)
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import ExportParityError, export

    try:
        result = export(args.checkpoint, args.out_dir, format=args.format, framework=args.framework,
                        opset=args.opset, dynamic_size=args.dynamic_size, dtype=args.dtype, quantize=args.quantize,
                        calibration=args.calibration, timm_model_name=args.timm_model, force=args.force,
                        progress=not args.quiet)
    except ExportParityError as e:
        print(f"vitx: export failed validation: {e}", file=sys.stderr)
        return EXIT_PARITY_FAILED
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return EXIT_OK
    if args.quiet:
        return EXIT_OK
    opset = f", opset {result.opset}" if result.opset is not None else ""
    print(f"{result.format} <- {result.framework} ({result.dtype}{opset}): wrote {result.path}")
    checks = ", ".join(f"{name} {diff:.2e}" for name, diff in result.parity.items())
    print(f"  max |diff| vs {result.framework}: {checks} (bound {result.bound:.0e})")
    if result.optimized_path is not None:
        checks = ", ".join(f"{name} {diff:.2e}" for name, diff in result.optimized_parity.items())
        print(f"  {result.optimized_path.name}: {checks}")
    if result.fused:
        print("  fused nodes: " + ", ".join(f"{op} {n}" for op, n in result.fused.items() if n))
    if result.quantized_path is not None:
        print(f"  int8: {result.quantized_path}")
    return EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    from .detect import open_checkpoint
    from .formats.base import PROVENANCE_KEY, architecture_of

    loaded = open_checkpoint(args.checkpoint, timm_model_name=args.timm_model)
    config = loaded.config
    parameters = int(sum(int(_prod(v.shape)) for v in loaded.state.values()))
    dtypes = sorted({str(v.dtype) for v in loaded.state.values()})
    info: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "file": loaded.path,
        "format": loaded.format,
        "model": architecture_of(loaded.task),
        "parameters": parameters,
        "dtypes": dtypes,
        "config": {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id", PROVENANCE_KEY)},
        "num_labels": config.num_labels if loaded.task == "classification" else 0,
        "labels": [config.id2label[i] for i in sorted(config.id2label)] if loaded.task == "classification" else [],
        "notes": loaded.notes,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    c = config
    print(f"checkpoint  {info['checkpoint']}")
    print(f"file        {info['file']}")
    print(f"format      {info['format']}")
    print(f"model       {info['model']}")
    print(f"parameters  {parameters:,} ({', '.join(dtypes)})")
    print(f"config      hidden {c.hidden_size}, layers {c.num_hidden_layers}, heads {c.num_attention_heads}, "
          f"mlp {c.intermediate_size}, image {c.image_size}, patch {c.patch_size}, channels {c.num_channels}, "
          f"act {c.hidden_act}, eps {c.layer_norm_eps:g}, qkv_bias {c.qkv_bias}")
    labels = info["labels"]
    if labels:
        shown = ", ".join(f"{i}: {name}" for i, name in enumerate(labels[:10]))
        print(f"labels      {len(labels)}: {shown}{' ...' if len(labels) > 10 else ''}")
    else:
        print("labels      none (no classifier head)")
    for note in loaded.notes:
        print(f"note        {note}")
    return EXIT_OK


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


COMMANDS = {"convert": _cmd_convert, "parity": _cmd_parity, "classify": _cmd_classify, "predict": _cmd_predict,
            "finetune": _cmd_finetune, "attention": _cmd_attention, "export": _cmd_export, "info": _cmd_info}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vitx`` console script. Returns the exit code (also via SystemExit)."""
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup_quiet(args.quiet)
    try:
        code = COMMANDS[args.command](args)
    except (CheckpointError, FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, ValueError, ImportError) as e:
        message = str(e) or type(e).__name__
        print(f"vitx: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # disk full, read-only file system, file too large: the user's environment
        where = f"{e.filename}: " if e.filename else ""
        print(f"vitx: error: {where}{os.strerror(e.errno) if e.errno else e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if args.command == "predict":  # its rows are kept on purpose: --resume finishes the file
            print(f"vitx: interrupted; the rows written so far are kept in {args.output}: run the same command with "
                  "--resume to finish it", file=sys.stderr)
        else:
            print("vitx: interrupted (nothing half-written was left behind)", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
