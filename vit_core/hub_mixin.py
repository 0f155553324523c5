"""``push_to_hub`` for the objects that write one file (ViTConfig, the image processors), as
transformers' ``PushToHubMixin``; the upload itself is :func:`vit_core.pretrained.push_to_hub`."""

from __future__ import annotations

from typing import Any, ClassVar


class PushToHubMixin:
    """Adds transformers' ``push_to_hub(repo_id, ...)`` to a class with ``save_pretrained(directory)``."""

    _hub_commit_message: ClassVar[str] = "Upload model"

    def push_to_hub(self, repo_id: str, use_temp_dir: bool | None = None, commit_message: str | None = None,
                    private: bool | None = None, token: str | bool | None = None, revision: str | None = None,
                    create_pr: bool = False, commit_description: str | None = None) -> Any:
        """Upload what ``save_pretrained`` writes to the hub repo ``repo_id`` (created when absent).

        Args:
            repo_id: "org/name" or "name".
            use_temp_dir: accepted for transformers' signature (a temporary directory is always used).
            commit_message: the commit message (default "Upload config" / "Upload image processor").
            private: create the repo private.
            token: the hub token.
            revision: the branch to commit to.
            create_pr: open a pull request instead.
            commit_description: the commit's description.

        Returns:
            huggingface_hub's CommitInfo.
        """
        from .pretrained import push_to_hub

        return push_to_hub(self.save_pretrained, repo_id, use_temp_dir=use_temp_dir, commit_message=commit_message,
                           private=private, token=token, revision=revision, create_pr=create_pr,
                           commit_description=commit_description, default_message=self._hub_commit_message)
