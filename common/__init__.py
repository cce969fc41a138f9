"""common: the utilities every other package shares, depending on none of them.

Owns the one typed loader of configuration sections (`config_loading`: YAML
recipes plus dotted overrides, coerced and checked against dataclass
annotations, errors as ConfigError naming the field) and crash-safe file writes
(`atomic_files`: a temporary beside the final name, fsync, rename; plain file
names only). It may import the standard library and PyYAML, nothing of
`modeling`, `pipeline` or `sharding`, so each of them can import it.
"""
