"""Duplicate images in an embeddings file: exact copies by content, near copies by cosine similarity, the
threshold fitted to the user's own images, what to keep, and leaks between two files.

`pairs` finds the close pairs, `groups` joins them into groups (`find_duplicates`, what `gpl neighbors
--duplicates` runs), `keep` chooses one image per group, `model` holds the shapes every part shares.
"""
