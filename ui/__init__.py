"""Streamlit glue for HemaScribe's pages.

`ui.resources` is the only place that caches shared resources (the model bundle and the
feedback store); `ui.widgets` draws reusable pieces; `ui.cases` turns uploads into described,
recorded cases; `ui.feedback` is the expert-feedback panel. Pages import `ui` and `core`
only, and `core` never imports streamlit.
"""
