"""dcorfs: mount DCOR as a read-only filesystem of RT-DC feature files."""

__version__ = "0.1.0.dev0"
