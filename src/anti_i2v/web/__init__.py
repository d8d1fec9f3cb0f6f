"""`anti-i2v serve`: a web page that protects uploaded photos (Gradio, in the ``web`` extra).

`service` does the work without any page (checks, protection, zip, verification),
`views` draws the comparison pictures, `workspace` owns the temporary folder, and `app`
builds and runs the Gradio page on top of them.
"""
