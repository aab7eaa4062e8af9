"""The registry operator's commands, where they meet a mistyped or forgotten data folder."""

from click.testing import CliRunner

from master.TaskMaster import cli


def run(*arguments):
    return CliRunner().invoke(cli, list(arguments), env={"PHT_DATABASE_URL": None})


def test_a_command_on_a_folder_without_a_registry_fails_and_makes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in (["list-sites"], ["list-researchers"], ["revoke", "hospital-a"], ["rotate-token", "alice"]):
        listed = run(*command)
        assert listed.exit_code == 1, command
        assert f"no registry in {tmp_path / 'registry-data'}" in listed.stderr
        assert "give the registry's --data-dir" in listed.stderr
    assert list(tmp_path.iterdir()) == []


def test_data_dir_is_taken_before_or_after_the_command(tmp_path):
    data = str(tmp_path / "registry")
    made = run("create-site", "hospital-a", "--data-dir", data)
    assert made.exit_code == 0, made.output
    assert made.stderr == f"warning: making a new, empty registry in {data}; if you meant an existing one, " \
                          "give its --data-dir\n"
    assert made.stdout.startswith("pht_")

    researcher = run("--data-dir", data, "create-researcher", "alice")
    assert researcher.exit_code == 0 and researcher.stderr == ""
    for listing in (run("list-sites", "--data-dir", data), run("--data-dir", data, "list-sites")):
        assert listing.exit_code == 0 and listing.stdout.startswith("hospital-a\tactive\tlast seen never")
    assert run("list-researchers", "--data-dir", data).stdout.startswith("alice\tactive\tsince ")


def test_the_data_dir_after_the_command_wins(tmp_path):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    assert run("create-site", "hospital-a", "--data-dir", first).exit_code == 0
    assert run("create-site", "hospital-b", "--data-dir", second).exit_code == 0
    listing = run("--data-dir", first, "list-sites", "--data-dir", second)
    assert listing.stdout.startswith("hospital-b\t") and "hospital-a" not in listing.stdout
