// A Crail NameNode for tests and small setups: Apache Crail never published
// its crail-namenode jar (Maven Central has the client, the RPC binding and
// the storage tiers, not the NameNode; see docs/CRAIL.md). This one speaks
// Crail's own NameNode protocol through Crail's own TCP RPC binding, so the
// real client and the real TCP DataNode talk to it unchanged. It keeps the
// tree in memory (as Crail's does), hands out the blocks DataNodes register,
// and frees a removed file's blocks after the token expiration, when no
// client can still be writing them. Written for kvfs; not Crail's code.
//
//   java -cp CLASSPATH KvfsNameNode      (crail.namenode.address from $CRAIL_HOME/conf/crail-site.conf)

import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ConcurrentLinkedDeque;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;

import org.apache.crail.CrailNodeType;
import org.apache.crail.conf.CrailConfiguration;
import org.apache.crail.conf.CrailConstants;
import org.apache.crail.metadata.BlockInfo;
import org.apache.crail.metadata.DataNodeInfo;
import org.apache.crail.metadata.FileInfo;
import org.apache.crail.metadata.FileName;
import org.apache.crail.rpc.RpcBinding;
import org.apache.crail.rpc.RpcErrors;
import org.apache.crail.rpc.RpcNameNodeService;
import org.apache.crail.rpc.RpcNameNodeState;
import org.apache.crail.rpc.RpcProtocol;
import org.apache.crail.rpc.RpcRequestMessage;
import org.apache.crail.rpc.RpcResponseMessage;
import org.apache.crail.rpc.RpcServer;
import org.apache.crail.utils.CrailUtils;

public class KvfsNameNode implements RpcNameNodeService {

	/** A file or directory: Crail's FileInfo plus what the NameNode keeps about it. */
	static final class Node extends FileInfo {
		int component;
		final ConcurrentHashMap<Integer, Node> children = new ConcurrentHashMap<>();
		final ConcurrentHashMap<Integer, BlockInfo> blocks = new ConcurrentHashMap<>();
		final AtomicLong nextRecord = new AtomicLong(0); // directories: the next record's offset

		Node(long fd, int component, CrailNodeType type, boolean enumerable) {
			super(fd, type, enumerable);
			this.component = component;
			setModificationTime(System.currentTimeMillis());
		}

		void placeRecord(long offset) {
			setDirOffset(offset);
		}

		// a directory's size is the records the NameNode placed, never what a client says
		@Override
		public long setCapacity(long capacity) {
			return getType().isContainer() ? getCapacity() : super.setCapacity(capacity);
		}

		@Override
		public void updateToken() {
			if (!getType().isContainer()) {
				super.updateToken();
			}
		}
	}

	private final long serviceId;
	private final AtomicLong nextFd;
	private final Node root;
	private final ConcurrentHashMap<Long, Node> open = new ConcurrentHashMap<>(); // fd -> node
	private final ConcurrentLinkedDeque<BlockInfo> free = new ConcurrentLinkedDeque<>();
	private final ConcurrentHashMap<Long, AtomicLong> freeByDataNode = new ConcurrentHashMap<>();
	private final ScheduledExecutorService later = Executors.newSingleThreadScheduledExecutor(r -> {
		Thread t = new Thread(r, "free-blocks");
		t.setDaemon(true);
		return t;
	});

	KvfsNameNode() {
		serviceId = CrailUtils.getServiceId(CrailConstants.NAMENODE_ADDRESS);
		nextFd = new AtomicLong(serviceId);
		root = new Node(nextFd.getAndAdd(CrailUtils.getServiceSize()), 0, CrailNodeType.DIRECTORY, true);
		open.put(root.getFd(), root);
	}

	// -- the tree -----------------------------------------------------------------------

	/** The node NAME's first DEPTH components lead to; null if any is missing. */
	private Node walk(FileName name, int depth, RpcNameNodeState state) {
		Node node = root;
		for (int i = 0; i < depth; i++) {
			if (!node.getType().isContainer()) {
				state.setError(RpcErrors.ERR_PARENT_NOT_DIR);
				return null;
			}
			node = node.children.get(name.getComponent(i));
			if (node == null) {
				return null;
			}
		}
		return node;
	}

	private Node file(FileName name, RpcNameNodeState state) {
		return walk(name, name.getLength(), state);
	}

	private Node parent(FileName name, RpcNameNodeState state) {
		return name.getLength() == 0 ? null : walk(name, name.getLength() - 1, state);
	}

	/** Put CHILD under DIR with a fresh record slot; false if the name is taken. */
	private boolean link(Node dir, Node child) {
		if (dir.children.putIfAbsent(child.component, child) != null) {
			return false;
		}
		if (child.isEnumerable()) {
			child.placeRecord(dir.nextRecord.getAndAdd(CrailConstants.DIRECTORY_RECORD));
		}
		return true;
	}

	/** The block of DIR that holds CHILD's record, allocated on first use. */
	private BlockInfo recordBlock(Node dir, Node child) {
		int index = CrailUtils.computeIndex(child.getDirOffset());
		BlockInfo block = dir.blocks.get(index);
		if (block == null) {
			block = take();
			if (block == null) {
				return null;
			}
			BlockInfo raced = dir.blocks.putIfAbsent(index, block);
			if (raced != null) {
				give(block);
				block = raced;
			}
		}
		dir.incCapacity(CrailConstants.DIRECTORY_RECORD);
		return block;
	}

	// -- blocks -------------------------------------------------------------------------

	private BlockInfo take() {
		BlockInfo block = free.pollFirst();
		if (block != null) {
			freeByDataNode.get(block.getDnInfo().key()).decrementAndGet();
		}
		return block;
	}

	private void give(BlockInfo block) {
		free.addLast(block);
		freeByDataNode.computeIfAbsent(block.getDnInfo().key(), k -> new AtomicLong()).incrementAndGet();
	}

	/** NODE's blocks (and its children's) back to the free list, once no client can use them. */
	private void release(Node node) {
		later.schedule(() -> {
			freeTree(node);
		}, CrailConstants.TOKEN_EXPIRATION, TimeUnit.SECONDS);
	}

	private void freeTree(Node node) {
		open.remove(node.getFd());
		for (Node child : node.children.values()) {
			freeTree(child);
		}
		for (BlockInfo block : node.blocks.values()) {
			give(block);
		}
		node.blocks.clear();
	}

	// -- the protocol -------------------------------------------------------------------

	@Override
	public short createFile(RpcRequestMessage.CreateFileReq req, RpcResponseMessage.CreateFileRes res,
			RpcNameNodeState state) throws Exception {
		if (!RpcProtocol.verifyProtocol(RpcProtocol.CMD_CREATE_FILE, req, res)) {
			return RpcErrors.ERR_PROTOCOL_MISMATCH;
		}
		FileName name = req.getFileName();
		CrailNodeType type = req.getFileType();
		Node dir = parent(name, state);
		if (state.getError() != RpcErrors.ERR_OK) {
			return state.getError();
		}
		if (dir == null) {
			return RpcErrors.ERR_PARENT_MISSING;
		}
		if (!dir.getType().isContainer()) {
			return RpcErrors.ERR_PARENT_NOT_DIR;
		}
		Node node = new Node(nextFd.getAndAdd(CrailUtils.getServiceSize()), name.getFileComponent(), type,
				req.isEnumerable());
		BlockInfo first = take();
		if (first == null) {
			return RpcErrors.ERR_NO_FREE_BLOCKS;
		}
		node.blocks.put(0, first);
		if (!link(dir, node)) {
			give(first);
			return RpcErrors.ERR_FILE_EXISTS;
		}
		open.put(node.getFd(), node);
		BlockInfo dirBlock = null;
		if (node.getDirOffset() >= 0) {
			dirBlock = recordBlock(dir, node);
			if (dirBlock == null) {
				return RpcErrors.ERR_NO_FREE_BLOCKS;
			}
		}
		boolean writeable = !type.isDirectory();
		if (writeable) {
			node.updateToken();
		}
		res.shipToken(writeable);
		res.setParentInfo(dir);
		res.setFileInfo(node);
		res.setFileBlock(first);
		res.setDirBlock(dirBlock);
		return RpcErrors.ERR_OK;
	}

	@Override
	public short getFile(RpcRequestMessage.GetFileReq req, RpcResponseMessage.GetFileRes res,
			RpcNameNodeState state) throws Exception {
		if (!RpcProtocol.verifyProtocol(RpcProtocol.CMD_GET_FILE, req, res)) {
			return RpcErrors.ERR_PROTOCOL_MISMATCH;
		}
		Node node = file(req.getFileName(), state);
		if (state.getError() != RpcErrors.ERR_OK) {
			return state.getError();
		}
		if (node == null) {
			return RpcErrors.ERR_GET_FILE_FAILED;
		}
		if (req.isWriteable()) {
			if (!node.tokenFree()) {
				return RpcErrors.ERR_TOKEN_TAKEN;
			}
			node.updateToken();
			res.shipToken();
		}
		open.put(node.getFd(), node);
		res.setFileInfo(node);
		res.setFileBlock(node.blocks.get(0));
		return RpcErrors.ERR_OK;
	}

	@Override
	public short setFile(RpcRequestMessage.SetFileReq req, RpcResponseMessage.VoidRes res,
			RpcNameNodeState state) throws Exception {
		if (!RpcProtocol.verifyProtocol(RpcProtocol.CMD_SET_FILE, req, res)) {
			return RpcErrors.ERR_PROTOCOL_MISMATCH;
		}
		FileInfo info = req.getFileInfo();
		Node node = open.get(info.getFd());
		if (node == null) {
			return RpcErrors.ERR_FILE_NOT_OPEN;
		}
		// only the writer holding the token sets the size
		if (node.getToken() > 0 && node.getToken() == info.getToken()) {
			node.setCapacity(info.getCapacity());
		}
		if (req.isClose()) {
			node.resetToken();
		}
		return RpcErrors.ERR_OK;
	}

	@Override
	public short removeFile(RpcRequestMessage.RemoveFileReq req, RpcResponseMessage.DeleteFileRes res,
			RpcNameNodeState state) throws Exception {
		if (!RpcProtocol.verifyProtocol(RpcProtocol.CMD_REMOVE_FILE, req, res)) {
			return RpcErrors.ERR_PROTOCOL_MISMATCH;
		}
		FileName name = req.getFileName();
		Node dir = parent(name, state);
		Node node = file(name, state);
		if (state.getError() != RpcErrors.ERR_OK) {
			return state.getError();
		}
		if (dir == null || node == null) {
			return RpcErrors.ERR_GET_FILE_FAILED;
		}
		if (!node.children.isEmpty() && !req.isRecursive()) {
			return RpcErrors.ERR_HAS_CHILDREN;
		}
		res.setParentInfo(dir);
		res.setFileInfo(node);
		if (!dir.children.remove(node.component, node)) {
			return RpcErrors.ERR_GET_FILE_FAILED;
		}
		release(node);
		return RpcErrors.ERR_OK;
	}

	@Override
	public short renameFile(RpcRequestMessage.RenameFileReq req, RpcResponseMessage.RenameRes res,
			RpcNameNodeState state) throws Exception {
		if (!RpcProtocol.verifyProtocol(RpcProtocol.CMD_RENAME_FILE, req, res)) {
			return RpcErrors.ERR_PROTOCOL_MISMATCH;
		}
		FileName src = req.getSrcFileName();
		FileName dst = req.getDstFileName();
		Node srcDir = parent(src, state);
		Node node = file(src, state);
		Node dstDir = parent(dst, state);
		Node existing = file(dst, state);
		if (state.getError() != RpcErrors.ERR_OK) {
			return state.getError();
		}
		if (srcDir == null || node == null) {
			return RpcErrors.ERR_SRC_FILE_NOT_FOUND;
		}
		if (dstDir == null) {
			return RpcErrors.ERR_DST_PARENT_NOT_FOUND;
		}
		if (existing != null && !existing.getType().isContainer()) {
			return RpcErrors.ERR_FILE_EXISTS;
		}
		if (existing != null) {
			dstDir = existing; // into that directory, under its own name
		}
		BlockInfo srcBlock = node.getDirOffset() >= 0
				? srcDir.blocks.get(CrailUtils.computeIndex(node.getDirOffset()))
				: null;
		res.setSrcParent(srcDir);
		res.setSrcFile(node);
		res.setSrcBlock(srcBlock);
		if (!srcDir.children.remove(node.component, node)) {
			return RpcErrors.ERR_SRC_FILE_NOT_FOUND;
		}
		if (existing == null) {
			node.component = dst.getFileComponent();
		}
		if (!link(dstDir, node)) {
			return RpcErrors.ERR_FILE_EXISTS;
		}
		BlockInfo dstBlock = null;
		if (node.getDirOffset() >= 0) {
			dstBlock = recordBlock(dstDir, node);
			if (dstBlock == null) {
				return RpcErrors.ERR_NO_FREE_BLOCKS;
			}
		}
		res.setDstParent(dstDir);
		res.setDstFile(node);
		res.setDstBlock(dstBlock);
		return RpcErrors.ERR_OK;
	}

	@Override
	public short getDataNode(RpcRequestMessage.GetDataNodeReq req, RpcResponseMessage.GetDataNodeRes res,
			RpcNameNodeState state) throws Exception {
		if (!RpcProtocol.verifyProtocol(RpcProtocol.CMD_GET_DATANODE, req, res)) {
			return RpcErrors.ERR_PROTOCOL_MISMATCH;
		}
		AtomicLong count = freeByDataNode.get(req.getInfo().key());
		if (count == null) {
			return RpcErrors.ERR_DATANODE_NOT_REGISTERED;
		}
		res.setServiceId(serviceId);
		res.setFreeBlockCount((int) count.get());
		return RpcErrors.ERR_OK;
	}

	@Override
	public short setBlock(RpcRequestMessage.SetBlockReq req, RpcResponseMessage.VoidRes res,
			RpcNameNodeState state) throws Exception {
		if (!RpcProtocol.verifyProtocol(RpcProtocol.CMD_SET_BLOCK, req, res)) {
			return RpcErrors.ERR_PROTOCOL_MISMATCH;
		}
		// a DataNode offers a region of its memory: cut it into blocks
		BlockInfo region = req.getBlockInfo();
		DataNodeInfo dn = region.getDnInfo();
		AtomicLong known = freeByDataNode.putIfAbsent(dn.key(), new AtomicLong());
		if (known != null && region.getLba() == 0) {
			// a DataNode back at the same address after a restart: its memory
			// is new, so the free blocks of its last life must never be handed
			// out (the files that held blocks there lost those bytes with it)
			long key = dn.key();
			free.removeIf(b -> b.getDnInfo().key() == key);
			known.set(0);
		}
		long size = CrailConstants.BLOCK_SIZE;
		for (long off = 0; off + size <= region.getLength(); off += size) {
			give(new BlockInfo(dn, region.getLba() + off, region.getAddr() + off, (int) size, region.getLkey()));
		}
		return RpcErrors.ERR_OK;
	}

	@Override
	public short getBlock(RpcRequestMessage.GetBlockReq req, RpcResponseMessage.GetBlockRes res,
			RpcNameNodeState state) throws Exception {
		if (!RpcProtocol.verifyProtocol(RpcProtocol.CMD_GET_BLOCK, req, res)) {
			return RpcErrors.ERR_PROTOCOL_MISMATCH;
		}
		if (req.getPosition() < 0) {
			return RpcErrors.ERR_POSITION_NEGATIV;
		}
		Node node = open.get(req.getFd());
		if (node == null) {
			return RpcErrors.ERR_FILE_NOT_OPEN;
		}
		int index = CrailUtils.computeIndex(req.getPosition());
		BlockInfo block = node.blocks.get(index);
		if (block == null) {
			// only the token's holder (the writer) grows a file
			if (req.getToken() == 0) {
				return RpcErrors.ERR_CAPACITY_EXCEEDED;
			}
			if (node.getToken() != req.getToken()) {
				return RpcErrors.ERR_TOKEN_MISMATCH;
			}
			BlockInfo fresh = take();
			if (fresh == null) {
				return RpcErrors.ERR_NO_FREE_BLOCKS;
			}
			block = node.blocks.putIfAbsent(index, fresh);
			if (block != null) {
				give(fresh);
			} else {
				block = fresh;
			}
			node.setCapacity(req.getCapacity());
		}
		res.setBlockInfo(block);
		return RpcErrors.ERR_OK;
	}

	@Override
	public short getLocation(RpcRequestMessage.GetLocationReq req, RpcResponseMessage.GetLocationRes res,
			RpcNameNodeState state) throws Exception {
		if (!RpcProtocol.verifyProtocol(RpcProtocol.CMD_GET_LOCATION, req, res)) {
			return RpcErrors.ERR_PROTOCOL_MISMATCH;
		}
		if (req.getPosition() < 0) {
			return RpcErrors.ERR_POSITION_NEGATIV;
		}
		Node node = file(req.getFileName(), state);
		if (state.getError() != RpcErrors.ERR_OK) {
			return state.getError();
		}
		if (node == null) {
			return RpcErrors.ERR_GET_FILE_FAILED;
		}
		BlockInfo block = node.blocks.get(CrailUtils.computeIndex(req.getPosition()));
		if (block == null) {
			return RpcErrors.ERR_OFFSET_TOO_LARGE;
		}
		res.setBlockInfo(block);
		return RpcErrors.ERR_OK;
	}

	@Override
	public short dump(RpcRequestMessage.DumpNameNodeReq req, RpcResponseMessage.VoidRes res,
			RpcNameNodeState state) throws Exception {
		if (!RpcProtocol.verifyProtocol(RpcProtocol.CMD_DUMP_NAMENODE, req, res)) {
			return RpcErrors.ERR_PROTOCOL_MISMATCH;
		}
		System.out.println("open files " + open.size() + ", free blocks " + free.size());
		return RpcErrors.ERR_OK;
	}

	@Override
	public short ping(RpcRequestMessage.PingNameNodeReq req, RpcResponseMessage.PingNameNodeRes res,
			RpcNameNodeState state) throws Exception {
		if (!RpcProtocol.verifyProtocol(RpcProtocol.CMD_PING_NAMENODE, req, res)) {
			return RpcErrors.ERR_PROTOCOL_MISMATCH;
		}
		res.setData(req.getOp() + 1);
		return RpcErrors.ERR_OK;
	}

	public static void main(String[] args) throws Exception {
		CrailConfiguration conf = new CrailConfiguration();
		CrailConstants.updateConstants(conf);
		CrailConstants.printConf();
		CrailConstants.verify();
		KvfsNameNode service = new KvfsNameNode();
		RpcBinding binding = RpcBinding.createInstance(CrailConstants.NAMENODE_RPC_TYPE);
		RpcServer server = binding.launchServer(service);
		server.init(conf, args);
		server.printConf(CrailUtils.getLogger());
		server.run();
	}
}
