"""Evaluate: ``python eval.py --config FILE --checkpoint PATH [dotted.key=value ...]``.

Accepts this project's checkpoints (``last.pt``, ``best.pt``, ``best.safetensors``),
released PytorchInsight ``*.pth.tar`` files and plain state dicts. Also under torchrun:
each process evaluates its shard and the counts are summed exactly. The last line is
``top1=<%> top5=<%> images=<n>``.
"""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe (model and val data)")
    parser.add_argument("--checkpoint", required=True, help="weights to evaluate")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    args = parser.parse_args(argv)

    from data import DatasetError
    from sge import distributed, engine
    from sge.checkpoint import CheckpointError
    from sge.config import ConfigError, load_config
    try:
        # Evaluation never resumes training: a stale train.resume path must not stop it.
        cfg = load_config(args.config, [*args.overrides, "train.resume=never"])
        result = engine.evaluate_checkpoint(cfg, args.checkpoint)
    except (ConfigError, CheckpointError, DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    if distributed.is_main():
        print(f"loss={result['loss']:.4f} correct1={result['correct1']} "
              f"correct5={result['correct5']} img_per_s={result['img_per_s']:.1f}")
        print(f"top1={result['top1']:.3f} top5={result['top5']:.3f} images={result['images']}",
              flush=True)
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
