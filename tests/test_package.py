import subprocess
import sys


def test_the_data_modules_import_without_the_engine():
    code = (
        "import sys, lightning_maml.datamodules; "
        "print([m for m in sys.modules if m.startswith('lightning_maml.functional') "
        "or m in ('lightning_maml.module', 'lightning_maml.callbacks')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_top_level_names_resolve():
    import lightning_maml

    assert sorted(lightning_maml.__all__) == sorted(
        n for n in dir(lightning_maml) if n in lightning_maml.__all__
    )
    assert lightning_maml.MAMLModule.__name__ == "MAMLModule"
    assert lightning_maml.MetaSGD.__module__ == "lightning_maml.meta_sgd"
