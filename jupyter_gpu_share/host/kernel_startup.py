"""Run by IPython at a renter's kernel's start (copied into the kernel's
``$HOME/.ipython/profile_default/startup/``): the ``%gpu_share`` line magic.

``%gpu_share sync`` asks the notebook's side to bring back what the kernel created or
changed in its working folder, now: it opens a comm with target ``gpu_share.sync``,
which the user's server (the bridge, which sees every message) answers by bringing the
files back; a line in the next cell says what came back. Standalone (the kernel may not
see this package): nothing but IPython and the comm package.
"""


def _register_gpu_share_magic() -> None:
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        return

    def gpu_share(line: str) -> None:
        """%gpu_share sync: bring this kernel's new and changed files back to the notebook's
        folder (a local file changed meanwhile stays; the kernel's copy goes beside it)."""
        if line.strip() != "sync":
            print("usage: %gpu_share sync  (bring this kernel's files back to the notebook)")
            return
        try:
            from comm import create_comm
        except ImportError:
            from ipykernel.comm import Comm as create_comm  # older ipykernel
        channel = create_comm(target_name="gpu_share.sync", data={"ask": "sync"})
        channel.close()
        print("gpu-share: bringing back this kernel's files; the next cell says what came back")

    shell.register_magic_function(gpu_share, "line", "gpu_share")


_register_gpu_share_magic()
del _register_gpu_share_magic
