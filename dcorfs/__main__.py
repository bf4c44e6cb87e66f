from dcorfs.cli import main

if __name__ == "__main__":  # (not when multiprocessing imports it)
    raise SystemExit(main())
