"""The remote layer: talking to DCOR — HTTP, CKAN actions, dcserv, its S3 object store — and
to the shared cache tier on a site's S3 store.

`http` is the one place that sends requests (sessions, range GETs, the single retry policy);
`dcserv` is the DCOR client (actions, dcserv queries, basins, where each object's bytes are);
`s3` reads the object store directly (addresses, SigV4 signing, listing); `catalog` turns
answers into typed records (circles, collections, datasets, resources) and remembers them;
`buckets` lists circles' buckets without the API (`--s3-only`); `shared` is the cache tier
many nodes share (`--shared-cache`: pieces looked up before DCOR, uploaded after it);
`failures` remembers failures a retry at once does not cure. The server's behaviours relied
on are in doc/DCOR.md.

Imports: the shared base and the cache layer (answers are remembered in `cache.metastore`;
object identities, memory bounds).
"""
