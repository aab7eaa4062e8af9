"""The FileService at the path the original PyTaskManager's README starts it from:

    python client/FileService.py ...   is   python fileservice/FileService.py ...

The FileService is the trusted third party's service, not part of the site runner; see fileservice/."""

if __name__ == "__main__":
    from fileservice.__main__ import main
    main()
