"""HemaScribe core library: dual encoder, sentence bank, describe API, feedback store.

Never imports streamlit: the UI in `app.py`/`pages/` is a thin layer over this package.
"""
