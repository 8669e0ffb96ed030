"""The cache format, in one package: version, schema and codec, writer, reader, manifest.

Nothing outside `store/` knows the byte layout or the directory layout: `layout.CacheDir`
names every file of a cache and does the filesystem access to it, `atomic.py` is the one
way anything is written, `manifest.Manifest` is the manifest that callers read. See
`codec.py` for the encoding and `docs/cache-format.md` for the contract.
"""

FORMAT_VERSION = 1
"""Version of the on-disk format. Readers refuse versions they do not know."""
