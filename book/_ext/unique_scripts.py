"""Sphinx extension of this book: each script once per page.

sphinx-thebe adds its configuration script after the HTML builder has started, and Sphinx 7 then
lists it twice; the second copy redeclares ``const THEBE_JS_URL`` and the browser reports an
uncaught SyntaxError on every page. This drops repeated scripts (same file and same body) from each
page's context, keeping the first.
"""


def _unique(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for script in scripts:
        # the file (an inline script has None or ""), and its attributes, an inline body among them
        key = (str(getattr(script, "filename", script) or ""),
               tuple(sorted(getattr(script, "attributes", {}).items())))
        if key in seen:
            continue
        seen.add(key)
        kept.append(script)
    context["script_files"] = kept


def setup(app):
    # early: html-page-context stops at the first handler that returns a template name
    app.connect("html-page-context", _unique, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
