"""Near-duplicate removal: exact hashing, then MinHash-LSH with exact-Jaccard verification."""
