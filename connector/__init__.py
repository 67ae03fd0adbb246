"""kvfs_connector: a vLLM V1 KV connector that stores KV caches as files on a kvfs mount."""
