"""Reports over the result feathers (accuracy, paraphrase diversity)."""
