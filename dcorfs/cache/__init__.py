"""The cache layer: object identities and the bytes kept of them, in memory and on disk.

Everything above reads remote bytes through here and nothing here knows where bytes come from
(a fetch function is injected by the wiring). `identity` names an object (`ObjectId`: key,
ETag, size: what every layer's bytes are keyed by); `diskstore` keeps blocks on disk,
checksummed and bounded; `blockcache` serves byte ranges
from memory over disk over the fetcher, single-flight, in parallel; `derived` does the same for
bytes computed from remote objects (decoded feature values); `metastore` remembers API answers
so a mount works offline, under the keys `answers` makes (one function per kind, versioned);
`prefetch` is the policy of what is fetched or made ahead of readers (every constant of it);
`cachedir` names the files of a cache directory.

Imports: only the shared base (`dcorfs.errors`, `dcorfs.settings`). See doc/ARCHITECTURE.md.
"""
