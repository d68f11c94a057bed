"""The remediation flow a cloud application runs through a gitproxy front
door, with python-gitlab: read package.json, commit a dependency bump on a
new branch, open a merge request, then try to open the same merge request
again (GitLab answers 409).

usage: remediate.py BASE_URL PROJECT_PATH BRANCH PACKAGE VERSION
The token comes from GITLAB_TOKEN. Prints one JSON object on stdout.
"""

import base64
import json
import os
import sys
import warnings

import gitlab

warnings.simplefilter("error")

base, project_path, branch, package, version = sys.argv[1:6]
gl = gitlab.Gitlab(base, private_token=os.environ["GITLAB_TOKEN"], keep_base_url=True)

project = gl.projects.get(project_path)
f = project.files.get(file_path="package.json", ref=project.default_branch)
manifest = json.loads(base64.b64decode(f.content))
before = manifest["dependencies"][package]
manifest["dependencies"][package] = version
content = json.dumps(manifest, indent=2) + "\n"

commit = project.commits.create(
    {
        "branch": branch,
        "start_branch": project.default_branch,
        "commit_message": f"Bump {package} from {before} to {version}",
        "actions": [{"action": "update", "file_path": "package.json", "content": content}],
    }
)
mr_data = {
    "source_branch": branch,
    "target_branch": project.default_branch,
    "title": f"Bump {package} from {before} to {version}",
    "description": f"Fixes known vulnerabilities of {package} {before}.",
}
mr = project.mergerequests.create(mr_data)

duplicate = None
try:
    project.mergerequests.create(mr_data)
except gitlab.exceptions.GitlabCreateError as e:
    body = e.response_body
    duplicate = {
        "status": e.response_code,
        "body": body.decode() if isinstance(body, bytes) else body,
    }

print(
    json.dumps(
        {
            "project_id": project.id,
            "before": before,
            "commit_id": commit.id,
            "commit_title": commit.title,
            "mr_iid": mr.iid,
            "mr_web_url": mr.web_url,
            "mr_state": mr.state,
            "duplicate": duplicate,
        }
    )
)
