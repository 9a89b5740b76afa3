"""The private Ray APIs the project uses (nikl_ray/ray_private.py) are all in the installed Ray: no
Ray instance is started, only modules imported and attributes looked up."""

from nikl_ray import ray_private


def test_the_installed_ray_has_every_private_name_the_project_uses():
    gone = ray_private.missing()
    assert not gone, "the installed Ray no longer has:\n  " + "\n  ".join(gone)


def test_a_missing_name_is_reported_by_its_module_and_attribute():
    required = [("ray._private.worker", "get_dashboard_url", "kept"),
                ("ray._private.worker", "no_such_function", "a renamed helper"),
                ("ray.train.v2._internal.no_such_module", "Anything", "a moved module")]
    assert ray_private.missing(required) == ["ray._private.worker:no_such_function (a renamed helper)",
                                             "ray.train.v2._internal.no_such_module:Anything (a moved module)"]


def test_the_trainer_subclasses_build_on_the_installed_ray_train():
    guarded, inheriting = ray_private.trainer_classes(lambda: None, "NIKL_RAY_TEST_NO_SUCH_VARIABLE")
    assert issubclass(inheriting, guarded) and guarded.keep_datasets_callback is False
