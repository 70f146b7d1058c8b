"""The Streamlit dashboard: an HTTP client of the fundus2video API.

`ui` imports neither `encoder`, `index` nor `retrieval`; it only speaks HTTP
(`ui.client`). Start it with `fundus2video ui --api URL` or
`streamlit run ui/app.py -- --api URL` (the process helpers behind the first:
`retrieval.apps.processes`).
"""
