"""recycler's Prefect flows (installed as the package `recycler_flows`).

The release cycle, the watcher and manual transfers are library functions (recycler.service); this
package only makes each of their steps a Prefect task (`tasks.prefect_step`), declares the flows that
deployments run, and mounts the service commands into the `recycler` CLI. Importing it loads neither
torch nor transformers.
"""
