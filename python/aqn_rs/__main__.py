"""`python -m aqn_rs` is the `aqn-rs` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
