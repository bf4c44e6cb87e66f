"""A local DCOR for tests, the demo and offline work: CKAN's action API, dcserv, the download
routes and an S3 object store, behaving as the real site does.

Each behaviour of the real server that the mount relies on (condensing that lags or fails,
fields filled late, intra-dataset basins, paging, access through collections, files not on S3,
permanent errors, tokens, bucket names) is described, with the server code that decides it,
in the repository's doc/DCOR.md; the options of `SiteOptions` (site.py) reproduce them.
"""
