"""Replication cards: a paper's claim, bnlab's scaled-down experiment of it, and the pre-declared
contrasts its verdicts come from (catalogue), how a card run is judged (verdicts), drawn (figures),
stored and listed (service, repository) and served (routes)."""
