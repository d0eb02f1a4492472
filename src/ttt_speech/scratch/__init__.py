"""From nothing to a Moshi-architecture model: a small LM laid out as a released checkpoint (init-moshi).

The top floor, with corpus/ (make-corpus) and codec/ (train-codec): it uses everything below, nothing below uses it.
"""
