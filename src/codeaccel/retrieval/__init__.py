"""Retrieval drafting (CodeSwift, REST): drafts found in code that already exists.

Suffix-array indexes over token ids (``suffix_index``), the files a source holds
(``sources``), datastores on disk (``datastore``), the request's own text as a
source (``context``: prompt, generated tokens, predicted output), the weighted trie that merges
what every source retrieved (``trie``), the drafter (``drafter``), timing control
(``timing``), the acceptance cache (``acceptance_cache``), and hybrid drafting:
retrieval first, the draft model otherwise (``hybrid``).
"""
