"""The layers against real parts without FUSE: the devserver (dclab's own client proves its modes),
HTTP, S3 (SeaweedFS), the repository of served files.
"""
