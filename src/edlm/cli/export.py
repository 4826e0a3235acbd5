"""`edlm export`: a checkpoint SGLang / LMDeploy serve (SDAR), or a plain HF one."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export for SGLang / LMDeploy (SDAR format) or as a plain HF checkpoint",
                       description="Write MODEL (a converted or trained edlm dir) to OUT. --format sdar: the SDAR "
                       "layout that SGLang and LMDeploy serve as a block-diffusion model (Qwen3 bases, mask id "
                       "151669, no shift). --format hf: a plain HF checkpoint, LoRA merged, edlm "
                       "settings kept. Example: edlm export runs/q/model ./q-sdar --format sdar --threshold 0.9")
    p.add_argument("model", help="converted/trained edlm model dir (or a LoRA adapter dir on top of one)")
    p.add_argument("out", help="output directory")
    p.add_argument("--format", required=True, choices=["sdar", "hf"], help="sdar (SGLang / LMDeploy) or hf")
    p.add_argument("--threshold", type=float, default=None,
                   help="sdar only: confidence threshold written to dllm.yaml and the launch commands "
                   "(default: the model's, else the engine's)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT when it holds an earlier edlm output or checkpoint (never other files)")
    p.set_defaults(func=run)


def run(args) -> None:
    import yaml

    from edlm.serve.export import export, launch_commands

    out = export(args.model, args.out, args.format, threshold=args.threshold, force=args.force)
    print(f"exported {args.model} -> {out} (format {args.format})")
    if args.format == "sdar":
        settings = yaml.safe_load((out / "dllm.yaml").read_text())  # what SGLang will read
        for name, cmd in launch_commands(out, settings["block_size"], settings["threshold"]).items():
            print(f"{name}: {cmd}")
