"""Train: ``python train.py --config FILE [dotted.key=value ...]`` (also under torchrun).

Resumes from ``<output.dir>/checkpoints/last.pt`` when present (``train.resume=auto``).
Exit status: 0 when done or stopped by SIGTERM/SIGINT (state saved), 1 on an error, which
is printed as one line naming the key, file or step at fault.
"""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                        help="config overrides, e.g. train.epochs=5 data.batch_size=64")
    args = parser.parse_args(argv)

    from data import DatasetError
    from sge import distributed, engine
    from sge.checkpoint import CheckpointError
    from sge.config import ConfigError, load_config
    try:
        cfg = load_config(args.config, args.overrides)
        engine.fit(cfg)
    except (ConfigError, CheckpointError, DatasetError, engine.NonFiniteLossError,
            distributed.PeerLostError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
