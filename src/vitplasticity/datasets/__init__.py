"""Dataset preparation: every task ends as one prepared folder (see `prepared`)."""
