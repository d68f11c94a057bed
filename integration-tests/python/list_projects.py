"""Lists every project the token is a member of with Developer role or above,
through a gitproxy front door, with python-gitlab (the stock GitLab client).

usage: list_projects.py BASE_URL {offset|keyset} [PER_PAGE]
The token comes from GITLAB_TOKEN. Prints one JSON object on stdout:
{"username": ..., "ids": [...]}.

Any warning is an error: python-gitlab warns "The base URL in the server
response differs from the user-provided base URL" when a `Link` header still
names GitLab's own external URL instead of the front door, so that warning
fails the run.
"""

import json
import os
import sys
import warnings

import gitlab

warnings.simplefilter("error")

base, style = sys.argv[1], sys.argv[2]
per_page = int(sys.argv[3]) if len(sys.argv) > 3 else 100
token = os.environ["GITLAB_TOKEN"]

# auth() compares the user's `web_url` (a body field, which gitproxy never
# rewrites) with the base URL; SPEC 3.1: keep_base_url=True is how a client
# behind a front door says that is intended. The listing below uses a client
# without it, so pagination links that were not rewritten would warn.
gl_auth = gitlab.Gitlab(base, private_token=token, keep_base_url=True)
gl_auth.auth()
username = gl_auth.user.username

gl = gitlab.Gitlab(base, private_token=token)
kwargs = dict(get_all=True, membership=True, min_access_level=30, per_page=per_page)
if style == "keyset":
    kwargs.update(pagination="keyset", order_by="id", sort="asc")
elif style != "offset":
    sys.exit(f"unknown pagination style {style!r}")
projects = gl.projects.list(**kwargs)
print(json.dumps({"username": username, "ids": [p.id for p in projects]}))
