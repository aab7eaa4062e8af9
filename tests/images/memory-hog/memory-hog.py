"""Take memory a megabyte at a time (really written, so really used), up to 4 GB."""
hoard = []
for megabytes in range(1, 4097):
    hoard.append(b"x" * 2 ** 20)
    if megabytes % 64 == 0:
        print(f"holding {megabytes} MB", flush=True)
print("got 4 GB without being stopped")
