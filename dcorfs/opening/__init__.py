"""The opening layer: from a resource record to its opened files and text views.

`resources` finds where a resource's objects are (dcserv basins or S3 keys), gives them
identities (probing size and ETag), opens an RT-DC resource as its original and condensed
files side by side (features known early from the condensed file), follows intra-dataset
basins, warms scalar features, and recognises resources that change while DCOR works on
them (doc/DCOR.md §1–§3); `filetexts` makes dcserv's `metadata`, `logs` and `tables` answers
from the files themselves when the API is not used.

Imports: the shared base, cache, remote and hdf5 layers.
"""
