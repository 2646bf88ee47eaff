"""The only code that loads or places models: `loading` (cache, memory policy) and one recipe per model family."""
