"""The opening layer: from a resource record to its opened files and text views.

`objects` finds where a resource's objects are (dcserv basins or S3 keys, links, the download
route) and gives them identities (size and ETag, probed when unknown); `resources` opens an
RT-DC resource as its original and condensed files side by side (features known early from
the condensed file), follows intra-dataset basins, and recognises resources that change while
DCOR works on them (doc/DCOR.md §1–§3); `warm` brings values and files into the cache ahead of
readers; `pools` are the worker pools this work and the tree's run in, made by the wiring;
`filetexts` makes dcserv's `metadata`, `logs` and `tables` answers from the files themselves
when the API is not used. The tree depends on these through small Protocols (`fs.tree`).

Imports: the shared base, cache, remote and hdf5 layers.
"""
