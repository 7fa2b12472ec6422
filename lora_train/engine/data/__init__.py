"""Images and captions as training reads them: the folder rules, caption files, buckets and caches."""
