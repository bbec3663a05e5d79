"""The engine: the synchronous core (`LLMEngine`) and the offline API (`LLM`)."""
