"""What the registry's operator reads: every site with its health, every task with its runs. Read-only.

The same answers feed the operator's pages of the dashboard (master/dashboard/), so the page shows
what this API shows, no more. An operator's token comes from `TaskMaster.py create-operator NAME`.
"""

from apiflask import APIBlueprint
from flask import current_app

from master import auth, researcher_api, store
from master.schemas import OperatorSitePageOut, OperatorTaskPageOut, OperatorTaskQueryIn, PageIn

bp = APIBlueprint("operators", __name__, url_prefix="/api/operator", tag="Operator")


def sites_page(registry, page=1, per_page=50, now=None):
    """One page of every site, revoked ones included, as researchers see them (researcher_api.sites_page), with
    the number of its runs that have not ended."""
    listed = researcher_api.sites_page(registry, page, per_page, now, include_revoked=True)
    active = store.active_runs_by_site(registry.engine)
    for site in listed["items"]:
        site["active_runs"] = active.get(site["id"], 0)
    return listed


def tasks_page(registry, researcher=None, site=None, status=None, page=1, per_page=50):
    """One page of every researcher's tasks, oldest first, filtered by researcher, site and status."""
    items, total = store.list_all_tasks(registry.engine, researcher=researcher, site=site, status=status,
                                        page=page, per_page=per_page)
    return {"items": items, "total": total, "page": page, "per_page": per_page}


@bp.get("/sites")
@bp.auth_required(auth.token_auth, roles=[auth.OPERATOR])
@bp.input(PageIn, location="query")
@bp.output(OperatorSitePageOut)
def list_sites(query_data):
    """Every site, revoked ones too: online, SPARQL endpoint OK, runner version, last seen, runs not ended."""
    return sites_page(current_app.extensions["pht"], **query_data)


@bp.get("/tasks")
@bp.auth_required(auth.token_auth, roles=[auth.OPERATOR])
@bp.input(OperatorTaskQueryIn, location="query")
@bp.output(OperatorTaskPageOut)
def list_tasks(query_data):
    """Every researcher's tasks, oldest first, with their runs; filter by researcher, site and task status."""
    return tasks_page(current_app.extensions["pht"], **query_data)
