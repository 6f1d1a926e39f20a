"""Training without teacher forcing: the free-running trainer and the online trainer."""
