"""Stage 3, what people look at: the self-contained HTML pages, which examples they show, plots and
`explain` figures."""
